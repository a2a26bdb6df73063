"""Protocol 3, components (paper 4.2): do the heads and neurons DePass ranks first matter?

On prompts the model answers correctly, rank every attention head of every layer (one
DePass request) and the MLP neurons of the chosen layers by their DePass contribution to
the answer's logit; zero the top k with hooks and measure the answer. A faithful ranking
makes the answer fall fastest. Two sets of rules (``--rules``):

- ``strict``: k from ``--head-ks`` / ``--neuron-ks``; neurons of ``--neuron-layers``
  (default the last two); against gradient x activation per head and per neuron (the
  answer logit's gradient at the head's slice of the ``o_proj`` input, summed over
  positions) and random; success = the answer stays the top-1 next token.
- ``paper`` (as the paper's scripts): the top 1% of all heads and of all neurons of all
  layers (global), by the signed DePass score and by its absolute value (neurons by the
  taylor rule, every layer from one backward pass: the engine's reverse strategy); against the
  paper's baselines (``atp-chunk``, ``norm-chunk`` for heads; ``atp``, ``coef``,
  ``norm`` for neurons: ``hooks.paper_component_scores``), the per-head / per-neuron
  gradient x activation and random; success = the 5-token greedy generation under the
  zeroing starts with the answer.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depass_eval.data import load_cases
from depass_eval.hooks import (
    gradient_x_activation,
    masked_generate,
    masked_logits,
    paper_component_scores,
)
from depass_eval.report import line_plot, mean, sem, table
from depass_eval.runner import Context, Timer, run_correct
from depass_eval.source import Split

NAME = "components"
METHODS = ("depass", "gradient-x-activation", "random")
#: The methods of each kind under the paper's rules.
PAPER_METHODS: dict[str, tuple[str, ...]] = {
    "heads": ("depass", "depass-abs", "atp-chunk", "norm-chunk", "gradient-x-activation", "random"),
    "neurons": ("depass", "depass-abs", "atp", "coef", "norm", "gradient-x-activation", "random"),
}
KINDS = ("heads", "neurons")
#: Greedy tokens generated under each zeroing (paper rules).
GENERATED = 5


def rules_of(ctx: Context) -> str:
    return str(ctx.options.get("rules") or "strict")


def neuron_layers(ctx: Context) -> list[int]:
    """The layers whose neurons are ranked (negative indices count from the top); by
    default the last two (strict) or all (paper)."""
    layers = ctx.options.get("neuron_layers")
    if layers is None:
        layers = list(range(ctx.model.num_layers)) if rules_of(ctx) == "paper" else [-2, -1]
    return sorted({layer % ctx.model.num_layers for layer in layers})


def neuron_split_of(ctx: Context, split: Split | None) -> Split | None:
    """The DePass settings of the neuron ranking: ``--neuron-split`` if given; else the
    taylor rule under the paper's rules (every layer's neurons from one backward pass,
    the engine's reverse strategy) and the head runs' settings under the strict ones."""
    rule = ctx.options.get("neuron_split")
    if rule is None and rules_of(ctx) == "paper":
        rule = "taylor"
    if rule is None:
        return split
    return Split(rule, ctx.options.get("temperatures", [0.1])[0], False)


def one_percent(total: int) -> int:
    """The paper's top 1% of ``total`` components, rounded up (3 of SmolLM2's 270 heads)."""
    return max(1, math.ceil(total / 100))


def run(ctx: Context, dataset: str, size: int, progress: bool = True) -> list[dict[str, Any]]:
    return run_correct(ctx, load_cases(dataset), size, evaluate, progress)


def _random_order(ctx: Context, case_id: str, size: int) -> np.ndarray:
    rng = np.random.default_rng([ctx.seed, zlib.crc32(case_id.encode())])
    return rng.permutation(size)


def _order(scores: np.ndarray) -> np.ndarray:
    """Indices of the flattened ``scores``, largest first (ties: the lower index first)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64).reshape(-1), kind="stable")


def _neuron_scores(
    ctx: Context,
    ids: list[int],
    answer: int,
    layers: list[int],
    widths: list[int],
    split: Split | None,
) -> np.ndarray:
    """DePass scores of the neurons of ``layers``, layer after layer, flat: one request
    per width (the engine asks every layer of one request for all its neurons at one
    width; Qwen2-MoE's dense layers are narrower than its mixtures)."""
    per_layer: dict[int, np.ndarray] = {}
    for width in dict.fromkeys(widths):
        group = [layer for layer, w in zip(layers, widths, strict=True) if w == width]
        scores = ctx.depass.neuron_scores_of_layers(ids, answer, group, split)
        per_layer.update(zip(group, scores, strict=True))
    return np.concatenate([per_layer[layer] for layer in layers])


def evaluate(ctx: Context, case: dict[str, Any]) -> dict[str, Any]:
    """Rankings of every method and the answer under each top-k zeroing."""
    model = ctx.model
    paper = rules_of(ctx) == "paper"
    ids = model.encode(case["prompt"])
    answer = model.answer_id(case["answer"])
    layers = neuron_layers(ctx)
    widths = [model.neuron_width(layer) for layer in layers]  # a mixture's: every expert's
    seconds: dict[str, float] = {}
    rule = ctx.options.get("component_split")
    split = Split(rule, ctx.options.get("temperatures", [0.1])[0], False) if rule else None
    with Timer() as clock:
        head_scores = ctx.depass.head_scores(ids, answer, list(range(model.num_layers)), split)
    seconds["depass_heads"] = clock.seconds
    neuron_split = neuron_split_of(ctx, split)
    with Timer() as clock:
        neuron_scores = _neuron_scores(ctx, ids, answer, layers, widths, neuron_split)
    seconds["depass_neurons"] = clock.seconds
    with Timer() as clock:
        gxa_heads, gxa_neurons = gradient_x_activation(model, ids, answer, layers)
    seconds["gradient_x_activation"] = clock.seconds
    gxa_flat = np.concatenate([gxa_neurons[layer].numpy() for layer in layers])
    rankings: dict[str, dict[str, np.ndarray]] = {
        "heads": {
            "depass": _order(head_scores),
            "gradient-x-activation": _order(gxa_heads.numpy()),
            "random": _random_order(ctx, case["id"] + "/heads", head_scores.size),
        },
        "neurons": {
            "depass": _order(neuron_scores),
            "gradient-x-activation": _order(gxa_flat),
            "random": _random_order(ctx, case["id"] + "/neurons", neuron_scores.size),
        },
    }
    if paper:
        with Timer() as clock:
            theirs = paper_component_scores(model, ids, layers)
        seconds["paper_baselines"] = clock.seconds
        rankings["heads"]["depass-abs"] = _order(np.abs(head_scores))
        rankings["neurons"]["depass-abs"] = _order(np.abs(neuron_scores))
        for name, values in theirs["heads"].items():
            rankings["heads"][name] = _order(values.numpy())
        for name, per_layer in theirs["neurons"].items():
            flat = np.concatenate([per_layer[layer].numpy() for layer in layers])
            rankings["neurons"][name] = _order(flat)
        methods = PAPER_METHODS
        ks = {"heads": [one_percent(head_scores.size)], "neurons": [one_percent(len(gxa_flat))]}
    else:
        methods = {kind: METHODS for kind in KINDS}
        ks = {
            "heads": ctx.options.get("head_ks", [1, 3, 5, 10, 20]),
            "neurons": ctx.options.get("neuron_ks", [1, 5, 10, 50, 100]),
        }
    variants = [(kind, method, k) for kind in KINDS for method in methods[kind] for k in ks[kind]]
    rows = 1 + len(variants)  # row 0: nothing zeroed
    head_keep = torch.ones(rows, model.num_layers, model.num_heads)
    neuron_keep = {layer: torch.ones(rows, model.neuron_width(layer)) for layer in layers}
    starts = np.cumsum([0, *widths[:-1]])  # each layer's first index in the flat ranking
    for row, (kind, method, k) in enumerate(variants, start=1):
        top = rankings[kind][method][:k]
        if kind == "heads":
            head_keep[row].view(-1)[torch.as_tensor(top)] = 0.0
        else:
            for flat in top:
                at = int(np.searchsorted(starts, flat, side="right")) - 1
                neuron_keep[layers[at]][row, int(flat - starts[at])] = 0.0
    generated: list[str] = []
    with Timer() as clock:
        if paper:
            logits, tokens = masked_generate(model, ids, head_keep, neuron_keep, GENERATED)
            generated = [model.tokenizer.decode(t) for t in tokens.tolist()]
            correct = [starts_with_answer(text, case["answer"]) for text in generated]
        else:
            logits = masked_logits(model, ids, head_keep, neuron_keep)
            correct = (logits.argmax(-1) == answer).tolist()
    seconds["masking"] = clock.seconds
    probs = torch.softmax(logits, -1)[:, answer].tolist()
    top1 = (logits.argmax(-1) == answer).tolist()
    results: dict[str, Any] = {
        kind: {m: {"k": ks[kind], "prob": [], "correct": [], "top1": []} for m in methods[kind]}
        for kind in KINDS
    }
    for row, (kind, method, _k) in enumerate(variants, start=1):
        results[kind][method]["prob"].append(probs[row])
        results[kind][method]["correct"].append(bool(correct[row]))
        results[kind][method]["top1"].append(bool(top1[row]))
    row_out: dict[str, Any] = {
        "id": case["id"],
        "prompt": case["prompt"],
        "answer": case["answer"],
        "rules": rules_of(ctx),
        "tokens": len(ids),
        "answer_prob": probs[0],
        "correct": bool(correct[0]),
        "neuron_layers": layers,
        "neuron_split": neuron_split.rule if neuron_split else "engine default",
        "masking": results,
        "top_heads": {
            m: [_head_label(int(i), model.num_heads) for i in r[:5]]
            for m, r in rankings["heads"].items()
        },
        "seconds": seconds,
    }
    if paper:
        row_out["generated"] = generated[0]
    return row_out


def starts_with_answer(generated: str, answer: str) -> bool:
    """The paper's success: the greedy continuation begins with the answer (leading
    spaces aside)."""
    return generated.lstrip().startswith(answer.strip())


def _head_label(flat: int, heads: int) -> str:
    return f"L{flat // heads}.H{flat % heads}"


def summarize(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, mean probability and mean relative probability drop per method and k."""
    out: dict[str, Any] = {"protocol": NAME, "prompts": len(rows)}
    if not rows:
        return out
    for kind in KINDS:
        out[kind] = {}
        for method in rows[0]["masking"][kind]:
            ks = rows[0]["masking"][kind][method]["k"]
            probs = np.array([r["masking"][kind][method]["prob"] for r in rows])
            base = np.array([r["answer_prob"] for r in rows])[:, None]
            correct = np.array([r["masking"][kind][method]["correct"] for r in rows], dtype=float)
            out[kind][method] = {
                "k": ks,
                "accuracy": correct.mean(0).tolist(),
                "accuracy_sem": [sem(column) for column in correct.T],
                "mean_prob": probs.mean(0).tolist(),
                "relative_drop": ((base - probs) / base).mean(0).tolist(),
            }
    out["success"] = (
        "the 5-token greedy generation starts with the answer"
        if rows[0].get("rules") == "paper"
        else "the answer stays the top-1 next token"
    )
    out["base_accuracy"] = mean([float(r["correct"]) for r in rows])
    out["base_prob"] = mean([r["answer_prob"] for r in rows])
    out["neuron_layers"] = rows[0]["neuron_layers"]
    out["neuron_split"] = rows[0].get("neuron_split", "engine default")
    out["seconds_per_prompt"] = {
        key: mean([r["seconds"][key] for r in rows]) for key in rows[0]["seconds"]
    }
    return out


def markdown(summary: dict[str, Any], title: str) -> str:
    if not summary.get("prompts"):
        return f"## {title}\n\nNo prompts."
    text = [
        f"## {title}",
        "",
        f"{summary['prompts']} prompts the model answers correctly (mean answer probability"
        f" {summary['base_prob']:.3f}). Heads: all layers; neurons:"
        f" {_layers_text(summary['neuron_layers'])}, ranked by DePass"
        f" {summary.get('neuron_split', 'engine default')}. Accuracy = {summary['success']}"
        " (unzeroed:"
        f" {summary['base_accuracy']:.2f}); drop = mean (p - p') / p of the answer's first"
        " token. A faithful ranking makes both fall fastest (lower accuracy, larger drop).",
    ]
    for kind in KINDS:
        ks = summary[kind]["depass"]["k"]
        rows = []
        for method in summary[kind]:
            entry = summary[kind][method]
            rows.append(
                [
                    method,
                    *[
                        f"{a:.2f} ± {e:.2f} / {d:+.2f}"
                        for a, e, d in zip(
                            entry["accuracy"],
                            entry.get("accuracy_sem", [0.0] * len(ks)),
                            entry["relative_drop"],
                            strict=True,
                        )
                    ],
                ]
            )
        text += [
            "",
            f"**{kind}** zeroed (accuracy ± sem / relative drop):",
            "",
            table(["method", *[f"k={k}" for k in ks]], rows),
        ]
    seconds = summary["seconds_per_prompt"]
    text += [
        "",
        "Seconds per prompt: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()) + ".",
    ]
    return "\n".join(text)


def _layers_text(layers: list[int]) -> str:
    """``layers 0..29`` for a run of consecutive layers, else the list."""
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}..{layers[-1]}"
    return f"layers {layers}"


def plot(summary: dict[str, Any], out_dir: Path, title: str) -> None:
    """``heads.png`` and ``neurons.png``: accuracy and probability against k."""
    for kind in KINDS:
        panels = [
            (
                f"{kind}: answer accuracy",
                "top-1 accuracy",
                {m: (e["k"], e["accuracy"]) for m, e in summary[kind].items()},
            ),
            (
                f"{kind}: answer probability",
                "mean p(answer)",
                {m: (e["k"], e["mean_prob"]) for m, e in summary[kind].items()},
            ),
        ]
        line_plot(out_dir / f"{kind}.png", panels, f"{kind} zeroed (k)", title)
