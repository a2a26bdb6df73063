"""Protocol 2 under the paper's rules (``--rules paper``; the strict form is ``truth.py``).

As the paper's scripts run it: TruthfulQA's ``prompt_wrong`` (the question with *wrong*
information, the two options, "The answer is"); truthfulness probes trained at layers
10..L-2 (:func:`probe_layers`) and their readings averaged; the tokens of the prompt's
information span ranked by how much they push the probes towards "false" and about half
of them (``max(1, floor(50% n))``) deleted, the prompt re-tokenised; scored by the
5-token greedy generation: which option it names, against the correct one.

The rankings: ``depass-subspace`` (each token's DePass part of the residual entering
each probe layer at the last position, dotted with that probe's weight, averaged over
the layers; most negative first), ``self-probe`` (the probes read each token's own
residual; lowest first) and ``random``. Deleting the tokens that carry the falsehood
should make the model name the correct option more often.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np

from depass_eval.perturb import EditRules, floor_count
from depass_eval.probes import Probe, cached_probe, fit_probes, texts_and_labels
from depass_eval.report import mean, sem, table
from depass_eval.runner import Context, Timer
from depass_eval.source import Split

METHODS = ("depass-subspace", "self-probe", "random")
#: Percent of the information span deleted.
SHARE = 50
#: Greedy tokens generated to read the chosen option.
GENERATED = 5
OPTIONS = ("A", "B")


def probe_layers(num_layers: int) -> list[int]:
    """Layers 10..L-2 (for a model of fewer than 12 layers, L-2 alone)."""
    return list(range(min(10, num_layers - 2), num_layers - 1))


def load_probes(ctx: Context) -> list[Probe]:
    """One truthfulness probe per probe layer, trained once per run folder."""
    layers = probe_layers(ctx.model.num_layers)
    paths = [ctx.out_dir / f"probe-L{layer}.npz" for layer in layers]
    fitted: list[Probe] = []
    if not all(path.exists() for path in paths):
        size = ctx.options.get("probe_size")
        fitted = fit_probes(
            ctx.model,
            layers,
            texts_and_labels("truthful_train.json", size, ctx.seed),
            texts_and_labels("truthful_test.json", size, ctx.seed),
        )
    return [
        cached_probe(path, lambda k=k: fitted[k])  # type: ignore[misc]
        for k, path in enumerate(paths)
    ]


def information_span(model: Any, prompt: str, information: str) -> list[int]:
    """Positions of the tokens that overlap the information text in the prompt."""
    start = prompt.index(information)
    end = start + len(information)
    offsets = model.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


def chosen_option(text: str) -> str | None:
    """The first option letter a generation names, or None."""
    found = re.search(r"\b([AB])\b", text)
    return found.group(1) if found else None


def ranked_span(span: list[int], scores: np.ndarray) -> list[int]:
    """The span's positions by ``scores``, largest first (ties: the earlier first)."""
    return sorted(span, key=lambda p: (-float(scores[p]), p))


def evaluate(ctx: Context, probes: list[Probe], record: dict[str, Any]) -> dict[str, Any]:
    model = ctx.model
    prompt = record["prompt_wrong"]
    ids = model.encode(prompt)
    span = information_span(model, prompt, record["wrong_info"])
    layers = [probe.layer for probe in probes]
    seconds: dict[str, float] = {}
    with Timer() as clock:
        states = ctx.depass.token_states_of_layers(ids, layers, Split())
    seconds["depass-subspace"] = clock.seconds
    contributions = np.mean(
        [states[p.layer].astype(np.float64) @ p.weight[0] for p in probes], axis=0
    )
    last = model.residuals_at([ids], layers)[:, 0].double().numpy()  # (layers, D)
    conservation = max(
        abs(float(states[p.layer].astype(np.float64).sum(0) @ p.weight[0] - last[k] @ p.weight[0]))
        for k, p in enumerate(probes)
    )
    with Timer() as clock:
        every = model.residuals_all(ids, layers).double().numpy()  # (layers, N, D)
        own = np.mean([p.scores(every[k])[:, 0] for k, p in enumerate(probes)], axis=0)
    seconds["self-probe"] = clock.seconds
    rng = np.random.default_rng([ctx.seed, zlib.crc32(str(record["case_id"]).encode())])
    falsehood = {
        "depass-subspace": -contributions,
        "self-probe": -own,
        "random": rng.random(len(ids)),
    }
    rules = EditRules("paper")
    count = floor_count(SHARE, len(span))
    edits = [
        rules.edit(model.tokenizer, ids, ranked_span(span, falsehood[m]), "patch", count)
        for m in METHODS
    ]
    prompts = [tuple(ids), *edits]
    options = [
        chosen_option(model.tokenizer.decode(tokens)) for tokens in model.greedy(prompts, GENERATED)
    ]
    p_true = _mean_p_true(model, probes, prompts)
    correct = record["correct_option"]
    return {
        "id": str(record["case_id"]),
        "tokens": len(ids),
        "span_tokens": len(span),
        "span": model.token_texts([ids[p] for p in span]),
        "deleted": count,
        "correct_option": correct,
        "option": options[0],
        "p_true": p_true[0],
        "subspace_conservation_error": conservation,
        "masking": {
            method: {
                "option": options[k],
                "correct": options[k] == correct,
                "flipped": options[k] != options[0],
                "p_true_change": p_true[k] - p_true[0],
                "deleted_tokens": model.token_texts(
                    [ids[p] for p in sorted(ranked_span(span, falsehood[method])[:count])]
                ),
            }
            for k, method in enumerate(METHODS, start=1)
        },
        "seconds": seconds,
    }


def _mean_p_true(model: Any, probes: list[Probe], prompts: list[tuple[int, ...]]) -> list[float]:
    """The probes' mean P(true) at each prompt's last position."""
    resid = model.residuals_at(prompts, [p.layer for p in probes]).double().numpy()
    probs = [1 / (1 + np.exp(-p.scores(resid[k])[:, 0])) for k, p in enumerate(probes)]
    return np.mean(probs, axis=0).tolist()


def summarize(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    probes = load_probes(ctx)
    out: dict[str, Any] = {
        "protocol": "truth",
        "prompts": len(rows),
        "probes": [p.summary() for p in probes],
        "share_deleted": SHARE,
    }
    if not rows:
        return out
    base = [float(r["option"] == r["correct_option"]) for r in rows]
    out["unmasked_accuracy"] = mean(base)
    out["unmasked_accuracy_sem"] = sem(base)
    out["mean_p_true"] = mean([r["p_true"] for r in rows])
    out["max_subspace_conservation_error"] = max(r["subspace_conservation_error"] for r in rows)
    out["methods"] = {}
    for method in METHODS:
        entries = [r["masking"][method] for r in rows]
        accuracy = [float(e["correct"]) for e in entries]
        flipped = [float(e["flipped"]) for e in entries]
        out["methods"][method] = {
            "accuracy": mean(accuracy),
            "accuracy_sem": sem(accuracy),
            "flipped": mean(flipped),
            "flipped_sem": sem(flipped),
            "p_true_change": mean([e["p_true_change"] for e in entries]),
        }
    out["seconds_per_prompt"] = {
        k: mean([r["seconds"][k] for r in rows]) for k in rows[0]["seconds"]
    }
    return out


def markdown(summary: dict[str, Any], title: str) -> str:
    probes = summary["probes"]
    accuracies = ", ".join(f"L{p['layer']} {p['test_accuracy']:.2f}" for p in probes)
    text = [
        f"## {title}",
        "",
        f"Truthfulness probes at layers {probes[0]['layer']}..{probes[-1]['layer']}"
        f" (test accuracy: {accuracies}).",
    ]
    if not summary.get("prompts"):
        return "\n".join([*text, "", "No prompts."])
    text += [
        "",
        f"{summary['prompts']} TruthfulQA prompts with the wrong information; the 5-token"
        f" generation names the correct option in {summary['unmasked_accuracy']:.2f}"
        f" ± {summary['unmasked_accuracy_sem']:.2f}; the tokens' parts add up to each probe's"
        f" score within {summary['max_subspace_conservation_error']:.1e}. Deleting"
        f" {summary['share_deleted']}% of the information span's tokens, those that push the"
        " probes most towards false first:",
        "",
        table(
            ["method", "correct option", "sem", "option flipped", "sem", "P(true) change"],
            [
                [
                    method,
                    e["accuracy"],
                    e["accuracy_sem"],
                    e["flipped"],
                    e["flipped_sem"],
                    e["p_true_change"],
                ]
                for method, e in summary["methods"].items()
            ],
        ),
    ]
    return "\n".join(text)
