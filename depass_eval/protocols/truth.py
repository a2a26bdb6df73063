"""Protocol 2, subspace input attribution (paper 4.1.2): which input tokens write into a
truthfulness probe's subspace, and does masking them move the model's choice?

A logistic-regression probe is trained on the residual entering a layer (last token) of
``truthful_train`` and tested on ``truthful_test``. Its weight vector ``w`` is the
subspace. On TruthfulQA prompts (``prompt_correct``: the question, the true information
and the two options, then "The answer is"), token-level DePass runs from the embeddings
to that layer; token k's part of the last position's residual, dotted with ``w``, is its
contribution to the probe's score (the parts add up to the residual, so the
contributions add up to the score less its bias). The top tokens by that attribution, by
DePass's output attribution (the chosen option's logit) and at random are deleted; the
report gives how often the chosen option (" A" or " B") flips and how far the probe's
probability of "true" and the option margin move.

``--rules paper`` runs the paper's form of the experiment instead: ``truth_paper.py``.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from depass_eval import perturb
from depass_eval.data import read_json
from depass_eval.probes import Probe, cached_probe, fit_probe, texts_and_labels
from depass_eval.protocols import truth_paper
from depass_eval.report import line_plot, mean, table
from depass_eval.runner import Context, Timer, run_records
from depass_eval.source import Split

NAME = "truth"
METHODS = ("depass-subspace", "depass-output", "random")
PERCENTS = (10, 20, 30)
OPTIONS = ("A", "B")


def probe_layer(ctx: Context) -> int:
    layer = ctx.options.get("probe_layer")
    return ctx.model.num_layers // 2 if layer is None else int(layer)


def load_probe(ctx: Context) -> Probe:
    """The truthfulness probe, trained once per run folder (``probe.npz``)."""
    size = ctx.options.get("probe_size")
    return cached_probe(
        ctx.out_dir / "probe.npz",
        lambda: fit_probe(
            ctx.model,
            probe_layer(ctx),
            texts_and_labels("truthful_train.json", size, ctx.seed),
            texts_and_labels("truthful_test.json", size, ctx.seed),
        ),
    )


def _paper(ctx: Context) -> bool:
    return ctx.options.get("rules") == "paper"


def run(ctx: Context, dataset: str, size: int, progress: bool = True) -> list[dict[str, Any]]:
    records = read_json(dataset if dataset != "truthfulqa" else "truthfulqa.json")
    if _paper(ctx):
        probes = truth_paper.load_probes(ctx)
        work = lambda r: truth_paper.evaluate(ctx, probes, r)  # noqa: E731
    else:
        probe = load_probe(ctx)
        work = lambda r: evaluate(ctx, probe, r)  # noqa: E731
    return run_records(ctx, records, size, work, progress)


def _readings(ctx: Context, probe: Probe, prompts: list[tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Option margin (logit of the chosen-at-start option minus the other's is taken by
    the caller), option logits and the probe's P(true) of each prompt."""
    model = ctx.model
    logits = model.last_logits(prompts)
    option_ids = [model.answer_id(o) for o in OPTIONS]
    resid = model.residual(prompts, probe.layer).double().numpy()
    score = probe.scores(resid)[:, 0]
    return {"options": logits[:, option_ids].numpy(), "p_true": 1 / (1 + np.exp(-score))}


def evaluate(ctx: Context, probe: Probe, record: dict[str, Any]) -> dict[str, Any]:
    model = ctx.model
    ids = model.encode(record["prompt_correct"])
    option_ids = [model.answer_id(o) for o in OPTIONS]
    start = _readings(ctx, probe, [tuple(ids)])
    chosen = int(start["options"][0].argmax())
    seconds: dict[str, float] = {}
    with Timer() as clock:
        states = ctx.depass.token_states(ids, probe.layer, Split())  # (N, D)
    seconds["depass-subspace"] = clock.seconds
    contributions = states.astype(np.float64) @ probe.weight[0]
    resid = model.residual_all(ids, probe.layer)[-1].double().numpy()
    with Timer() as clock:
        output = ctx.depass.token_scores(ids, option_ids[chosen], Split())
    seconds["depass-output"] = clock.seconds
    rng = np.random.default_rng([ctx.seed, zlib.crc32(str(record["case_id"]).encode())])
    scores = {
        "depass-subspace": contributions,
        "depass-output": output.astype(np.float64),
        "random": rng.random(len(ids)),
    }
    edits: list[tuple[int, ...]] = []
    for method in METHODS:
        ranking = perturb.ranked_middle(scores[method])
        edits += [
            perturb.edited(ids, ranking, "patch", perturb.count_for(k, len(ranking)))
            for k in PERCENTS
        ]
    after = _readings(ctx, probe, edits)
    margin0 = float(start["options"][0, chosen] - start["options"][0, 1 - chosen])
    results: dict[str, Any] = {}
    for m, method in enumerate(METHODS):
        rows = slice(m * len(PERCENTS), (m + 1) * len(PERCENTS))
        options = after["options"][rows]
        results[method] = {
            "flipped": [bool(o.argmax() != chosen) for o in options],
            "margin_change": [float(o[chosen] - o[1 - chosen] - margin0) for o in options],
            "p_true_change": (after["p_true"][rows] - start["p_true"][0]).tolist(),
        }
    return {
        "id": str(record["case_id"]),
        "tokens": len(ids),
        "chosen": OPTIONS[chosen],
        "correct": OPTIONS[chosen] == record["correct_option"],
        "p_true": float(start["p_true"][0]),
        "subspace_conservation_error": float(abs(contributions.sum() - resid @ probe.weight[0])),
        "top_subspace_tokens": [
            model.token_texts([ids[p]])[0] for p in perturb.ranked_middle(contributions)[:5]
        ],
        "masking": results,
        "seconds": seconds,
    }


def summarize(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    if _paper(ctx):
        return truth_paper.summarize(ctx, rows)
    probe = load_probe(ctx)
    out: dict[str, Any] = {
        "protocol": NAME,
        "prompts": len(rows),
        "probe": probe.summary(),
        "percents": list(PERCENTS),
    }
    if not rows:
        return out
    out["chosen_correct"] = mean([float(r["correct"]) for r in rows])
    out["mean_p_true"] = mean([r["p_true"] for r in rows])
    out["max_subspace_conservation_error"] = max(r["subspace_conservation_error"] for r in rows)
    out["methods"] = {
        method: {
            key: np.mean([r["masking"][method][key] for r in rows], axis=0).tolist()
            for key in ("flipped", "margin_change", "p_true_change")
        }
        for method in METHODS
    }
    out["seconds_per_prompt"] = {
        k: mean([r["seconds"][k] for r in rows]) for k in rows[0]["seconds"]
    }
    return out


def markdown(summary: dict[str, Any], title: str) -> str:
    if "probes" in summary:
        return truth_paper.markdown(summary, title)
    probe = summary["probe"]
    text = [
        f"## {title}",
        "",
        Probe.describe(probe, "Truthfulness"),
    ]
    if not summary.get("prompts"):
        return "\n".join([*text, "", "No prompts."])
    text += [
        "",
        f"{summary['prompts']} TruthfulQA prompts (with the true information); the model picks"
        f" the correct option in {summary['chosen_correct']:.1%}; mean probe P(true)"
        f" {summary['mean_p_true']:.3f}; the tokens' subspace contributions add up to the probe"
        f" score within {summary['max_subspace_conservation_error']:.1e}.",
        "",
        "Deleting the top k% of tokens ranked by each method (flip rate of the chosen option /"
        " mean change of the probe's P(true) / mean change of the option margin):",
        "",
    ]
    rows = []
    for method, entry in summary["methods"].items():
        rows.append(
            [
                method,
                *[
                    f"{f:.2f} / {p:+.3f} / {m:+.2f}"
                    for f, p, m in zip(
                        entry["flipped"],
                        entry["p_true_change"],
                        entry["margin_change"],
                        strict=True,
                    )
                ],
            ]
        )
    text.append(table(["method", *[f"k={k}%" for k in summary["percents"]]], rows))
    return "\n".join(text)


def plot(summary: dict[str, Any], out_dir: Path, title: str) -> None:
    """``truth.png``: flip rate and probe change against k (strict rules; the paper's
    single deletion share has its table only)."""
    if "probes" in summary:
        return
    x = summary["percents"]
    panels = [
        (
            "chosen option flips",
            "flip rate",
            {m: (x, e["flipped"]) for m, e in summary["methods"].items()},
        ),
        (
            "probe P(true)",
            "mean change",
            {m: (x, e["p_true_change"]) for m, e in summary["methods"].items()},
        ),
    ]
    line_plot(out_dir / "truth.png", panels, "k (% of tokens deleted)", title)
