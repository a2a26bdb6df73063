"""Protocol 4, the language subspace (paper 4.3).

Each multilingual CounterFact fact is asked in six languages. At a split layer ``s``,
each prompt's last-position residual minus the mean of the six is its *language part*;
the *rest* is everything else (the mean at the last position, the residual unchanged at
the other positions), so the two add up to the residual. DePass carries [rest, language
part] forward:

- to a probe layer ``e``, where a language probe (trained on ``language_probe_train``
  residuals at ``e``, accuracy on ``language_probe_test`` reported) reads each part: the
  claim is that it finds the language in the language part and not in the rest;
- to the output, where the rest's state, read by the LM head, should still give the
  model's next token (the answer is language-independent knowledge).

``--rules paper`` places the language vector (the last position's residual minus the
six prompts' mean there) at **every** position, the rest being the residual minus it, and
puts the probe at the paper's layer 20 of 32, scaled by depth (:func:`paper_probe_layer`);
the strict rules keep it at the last position and probe at 3L/4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from depass_eval.data import read_json
from depass_eval.probes import Probe, cached_probe, fit_probe, texts_and_labels
from depass_eval.report import mean, table
from depass_eval.runner import Context, Timer, run_records
from engine.parts import module_tensor

NAME = "language"
#: The record keys of each language, in the probe's label order (0 English .. 5 Spanish).
LANGUAGES = ("original", "French", "German", "Italian", "Portuguese", "Spanish")
PARTS = ("rest", "language")


#: The paper's probe layer and its models' depth.
PAPER_PROBE_LAYER, PAPER_DEPTH = 20, 32


def paper_probe_layer(num_layers: int) -> int:
    """Layer 20 of the paper's 32-layer models, at the same depth of this one (19 of
    SmolLM2's 30, 11 of Gemma-3-270M's 18)."""
    return round(PAPER_PROBE_LAYER * num_layers / PAPER_DEPTH)


def paper_rules(ctx: Context) -> bool:
    return ctx.options.get("rules") == "paper"


def layers(ctx: Context) -> tuple[int, int]:
    """(split layer s, probe layer e): by default L/2 and 3L/4 (strict) or the paper's
    layer 20 of 32 scaled by depth (paper)."""
    n = ctx.model.num_layers
    split = ctx.options.get("split_layer")
    split = n // 2 if split is None else int(split)
    probe = ctx.options.get("probe_layer")
    if probe is None:
        probe = paper_probe_layer(n) if paper_rules(ctx) else (3 * n) // 4
        probe = max(split, probe)
    probe = int(probe)
    if not 0 <= split <= probe <= n:
        raise ValueError(f"need 0 <= split layer {split} <= probe layer {probe} <= {n}")
    return split, probe


def load_probe(ctx: Context) -> Probe:
    """The language probe at the probe layer, trained once per run folder."""
    size = ctx.options.get("probe_size")
    return cached_probe(
        ctx.out_dir / "probe.npz",
        lambda: fit_probe(
            ctx.model,
            layers(ctx)[1],
            texts_and_labels("language_probe_train.json", size, ctx.seed),
            texts_and_labels("language_probe_test.json", size, ctx.seed),
        ),
    )


def run(ctx: Context, dataset: str, size: int, progress: bool = True) -> list[dict[str, Any]]:
    probe = load_probe(ctx)
    name = "counterfact_multilingual.json" if dataset == "multilingual" else dataset
    work = lambda r: evaluate(ctx, probe, r)  # noqa: E731
    return run_records(ctx, read_json(name), size, work, progress)


def evaluate(ctx: Context, probe: Probe, record: dict[str, Any]) -> dict[str, Any]:
    model = ctx.model
    split, at = layers(ctx)
    unembed = module_tensor(model.unembedding()).detach().float()
    prompts = [model.encode(record[lang]["prompt"]) for lang in LANGUAGES]
    resids = [model.residual_all(ids, split) for ids in prompts]
    centre = torch.stack([r[-1] for r in resids]).mean(0)
    full_at = model.residual([tuple(p) for p in prompts], at).double().numpy()
    top1 = model.last_logits(prompts).argmax(-1).tolist()
    out: dict[str, Any] = {"id": str(record["case_id"]), "languages": {}}
    seconds = 0.0
    for label, (lang, ids, resid) in enumerate(zip(LANGUAGES, prompts, resids, strict=True)):
        parts = language_parts(resid, centre, paper_rules(ctx)).numpy()
        answer = model.answer_id(record[lang]["answer"])
        with Timer() as clock:
            at_probe, _ = ctx.depass.subspace(ids, split, parts, answer, at)
            at_output, answer_scores = ctx.depass.subspace(ids, split, parts, answer, None)
        seconds += clock.seconds
        read = probe.scores(at_probe.astype(np.float64)).argmax(-1)
        decoded = (torch.as_tensor(at_output, dtype=torch.float32) @ unembed.T).argmax(-1)
        out["languages"][lang] = {
            "label": label,
            "probe_full": int(probe.scores(full_at[label : label + 1]).argmax(-1)[0]),
            "probe_parts": {part: int(read[k]) for k, part in enumerate(PARTS)},
            "model_top1": int(top1[label]),
            "answer_id": answer,
            "model_correct": int(top1[label]) == answer,
            "decodes_top1": {
                part: int(decoded[k]) == int(top1[label]) for k, part in enumerate(PARTS)
            },
            "answer_scores": {part: float(answer_scores[k]) for k, part in enumerate(PARTS)},
        }
    out["seconds"] = seconds
    return out


def language_parts(resid: torch.Tensor, centre: torch.Tensor, every_position: bool) -> torch.Tensor:
    """(2, N, D) [rest, language part] of a prompt's residual (N, D) at the split layer,
    adding up to it: the language vector ``resid[-1] - centre`` at the last position only
    (strict) or at every position (paper)."""
    vector = resid[-1] - centre
    language = torch.zeros_like(resid)
    if every_position:
        language[:] = vector
    else:
        language[-1] = vector
    return torch.stack([resid - language, language])


def summarize(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    probe = load_probe(ctx)
    split, at = layers(ctx)
    out: dict[str, Any] = {
        "protocol": NAME,
        "cases": len(rows),
        "probe": probe.summary(),
        "split_layer": split,
        "probe_layer": at,
    }
    entries = [e for r in rows for e in r["languages"].values()]
    if not entries:
        return out
    out["prompts"] = len(entries)
    out["chance"] = 1 / len(LANGUAGES)
    out["probe_reads_language"] = {
        "full residual": mean([float(e["probe_full"] == e["label"]) for e in entries]),
        **{
            part: mean([float(e["probe_parts"][part] == e["label"]) for e in entries])
            for part in PARTS
        },
    }
    out["decodes_model_top1"] = {
        part: mean([float(e["decodes_top1"][part]) for e in entries]) for part in PARTS
    }
    out["model_accuracy"] = mean([float(e["model_correct"]) for e in entries])
    out["mean_answer_score"] = {
        part: mean([e["answer_scores"][part] for e in entries]) for part in PARTS
    }
    out["per_language"] = {
        lang: {
            part: mean(
                [
                    float(
                        r["languages"][lang]["probe_parts"][part] == r["languages"][lang]["label"]
                    )
                    for r in rows
                ]
            )
            for part in PARTS
        }
        for lang in LANGUAGES
    }
    out["seconds_per_case"] = mean([r["seconds"] for r in rows])
    return out


def markdown(summary: dict[str, Any], title: str) -> str:
    probe = summary["probe"]
    text = [
        f"## {title}",
        "",
        Probe.describe(probe, "Language") + " Chance: 1/6.",
    ]
    if not summary.get("prompts"):
        return "\n".join([*text, "", "No cases."])
    reads = summary["probe_reads_language"]
    decodes = summary["decodes_model_top1"]
    scores = summary["mean_answer_score"]
    text += [
        "",
        f"{summary['cases']} facts x 6 languages = {summary['prompts']} prompts; split at layer"
        f" {summary['split_layer']} (the language vector at"
        f" {'every position' if summary.get('rules') == 'paper' else 'the last position'}),"
        " DePass carries [rest, language part] to the probe layer"
        f" {summary['probe_layer']} and to the output. The model's top-1 is the answer's first"
        f" token in {summary['model_accuracy']:.1%} of the prompts.",
        "",
        table(
            [
                "what",
                "probe finds the prompt's language",
                "LM head of it gives the model's top-1",
                "mean score for the answer",
            ],
            [
                ["full residual", reads["full residual"], "", ""],
                ["rest (DePass)", reads["rest"], decodes["rest"], scores["rest"]],
                [
                    "language part (DePass)",
                    reads["language"],
                    decodes["language"],
                    scores["language"],
                ],
            ],
        ),
    ]
    return "\n".join(text)


def plot(summary: dict[str, Any], out_dir: Path, title: str) -> None:
    """``language.png``: the probe's accuracy on each part, per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = summary["per_language"]
    x = np.arange(len(LANGUAGES))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for k, part in enumerate(PARTS):
        ax.bar(x + (k - 0.5) * 0.38, [per[lang][part] for lang in LANGUAGES], 0.38, label=part)
    ax.axhline(summary["chance"], color="grey", linestyle=":", label="chance")
    ax.set_xticks(x, ["English", *LANGUAGES[1:]])
    ax.set_ylabel("language probe accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "language.png", dpi=130)
    plt.close(fig)
