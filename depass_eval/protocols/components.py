"""Protocol 3, components (paper 4.2): do the heads and neurons DePass ranks first matter?

On prompts the model answers correctly, rank every attention head of every layer (one
DePass request) and the MLP neurons of the chosen layers by their DePass contribution to
the answer's logit; zero the top k with hooks and measure the answer's top-1 accuracy and
probability. The same k are zeroed as ranked by gradient x activation (at the head and
neuron outputs) and at random. A faithful ranking makes both fall fastest.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depass_eval.data import load_cases
from depass_eval.hooks import gradient_x_activation, masked_logits
from depass_eval.report import line_plot, mean, table
from depass_eval.runner import Context, Timer, run_correct
from depass_eval.source import Split

NAME = "components"
METHODS = ("depass", "gradient-x-activation", "random")
KINDS = ("heads", "neurons")


def neuron_layers(ctx: Context) -> list[int]:
    """The layers whose neurons are ranked (negative indices count from the top)."""
    layers = ctx.options.get("neuron_layers", [-2, -1])
    return sorted({layer % ctx.model.num_layers for layer in layers})


def run(ctx: Context, dataset: str, size: int, progress: bool = True) -> list[dict[str, Any]]:
    return run_correct(ctx, load_cases(dataset), size, evaluate, progress)


def _random_order(ctx: Context, case_id: str, size: int) -> np.ndarray:
    rng = np.random.default_rng([ctx.seed, zlib.crc32(case_id.encode())])
    return rng.permutation(size)


def evaluate(ctx: Context, case: dict[str, Any]) -> dict[str, Any]:
    """Rankings of the three methods and the answer under each top-k zeroing."""
    model = ctx.model
    ids = model.encode(case["prompt"])
    answer = model.answer_id(case["answer"])
    layers = neuron_layers(ctx)
    width = model.intermediate_size
    seconds: dict[str, float] = {}
    rule = ctx.options.get("component_split")
    split = Split(rule, ctx.options.get("temperatures", [0.1])[0], False) if rule else None
    with Timer() as clock:
        head_scores = ctx.depass.head_scores(ids, answer, list(range(model.num_layers)), split)
    seconds["depass_heads"] = clock.seconds
    with Timer() as clock:
        neuron_scores = np.concatenate(
            [ctx.depass.neuron_scores(ids, answer, layer, split) for layer in layers]
        )
    seconds["depass_neurons"] = clock.seconds
    with Timer() as clock:
        gxa_heads, gxa_neurons = gradient_x_activation(model, ids, answer, layers)
    seconds["gradient_x_activation"] = clock.seconds
    rankings = {
        "heads": {
            "depass": np.argsort(-head_scores.reshape(-1), kind="stable"),
            "gradient-x-activation": np.argsort(-gxa_heads.numpy().reshape(-1), kind="stable"),
            "random": _random_order(ctx, case["id"] + "/heads", head_scores.size),
        },
        "neurons": {
            "depass": np.argsort(-neuron_scores, kind="stable"),
            "gradient-x-activation": np.argsort(
                -np.concatenate([gxa_neurons[layer].numpy() for layer in layers]), kind="stable"
            ),
            "random": _random_order(ctx, case["id"] + "/neurons", neuron_scores.size),
        },
    }
    ks = {
        "heads": ctx.options.get("head_ks", [1, 3, 5, 10, 20]),
        "neurons": ctx.options.get("neuron_ks", [1, 5, 10, 50, 100]),
    }
    variants = [(kind, method, k) for kind in KINDS for method in METHODS for k in ks[kind]]
    rows = 1 + len(variants)  # row 0: nothing zeroed
    head_keep = torch.ones(rows, model.num_layers, model.num_heads)
    neuron_keep = {layer: torch.ones(rows, width) for layer in layers}
    for row, (kind, method, k) in enumerate(variants, start=1):
        top = rankings[kind][method][:k]
        if kind == "heads":
            head_keep[row].view(-1)[torch.as_tensor(top)] = 0.0
        else:
            for flat in top:
                neuron_keep[layers[int(flat) // width]][row, int(flat) % width] = 0.0
    with Timer() as clock:
        logits = masked_logits(model, ids, head_keep, neuron_keep)
    seconds["masking"] = clock.seconds
    probs = torch.softmax(logits, -1)[:, answer].tolist()
    correct = (logits.argmax(-1) == answer).tolist()
    results: dict[str, Any] = {
        kind: {m: {"k": ks[kind], "prob": [], "correct": []} for m in METHODS} for kind in KINDS
    }
    for row, (kind, method, _k) in enumerate(variants, start=1):
        results[kind][method]["prob"].append(probs[row])
        results[kind][method]["correct"].append(bool(correct[row]))
    return {
        "id": case["id"],
        "prompt": case["prompt"],
        "answer": case["answer"],
        "tokens": len(ids),
        "answer_prob": probs[0],
        "correct": bool(correct[0]),
        "neuron_layers": layers,
        "masking": results,
        "top_heads": {
            m: [_head_label(int(i), model.num_heads) for i in r[:5]]
            for m, r in rankings["heads"].items()
        },
        "seconds": seconds,
    }


def _head_label(flat: int, heads: int) -> str:
    return f"L{flat // heads}.H{flat % heads}"


def summarize(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, mean probability and mean relative probability drop per method and k."""
    out: dict[str, Any] = {"protocol": NAME, "prompts": len(rows)}
    if not rows:
        return out
    for kind in KINDS:
        out[kind] = {}
        for method in METHODS:
            ks = rows[0]["masking"][kind][method]["k"]
            probs = np.array([r["masking"][kind][method]["prob"] for r in rows])
            base = np.array([r["answer_prob"] for r in rows])[:, None]
            correct = np.array([r["masking"][kind][method]["correct"] for r in rows], dtype=float)
            out[kind][method] = {
                "k": ks,
                "accuracy": correct.mean(0).tolist(),
                "mean_prob": probs.mean(0).tolist(),
                "relative_drop": ((base - probs) / base).mean(0).tolist(),
            }
    out["base_accuracy"] = mean([float(r["correct"]) for r in rows])
    out["base_prob"] = mean([r["answer_prob"] for r in rows])
    out["neuron_layers"] = rows[0]["neuron_layers"]
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
        f" {summary['base_prob']:.3f}). Heads: all layers; neurons: layers"
        f" {summary['neuron_layers']}. Accuracy = the answer stays top-1; drop = mean"
        " (p - p') / p. A faithful ranking makes both fall fastest (lower accuracy, larger drop).",
    ]
    for kind in KINDS:
        ks = summary[kind]["depass"]["k"]
        rows = []
        for method in METHODS:
            entry = summary[kind][method]
            rows.append(
                [
                    method,
                    *[
                        f"{a:.2f} / {d:+.2f}"
                        for a, d in zip(entry["accuracy"], entry["relative_drop"], strict=True)
                    ],
                ]
            )
        text += [
            "",
            f"**{kind}** zeroed (accuracy / relative drop):",
            "",
            table(["method", *[f"k={k}" for k in ks]], rows),
        ]
    seconds = summary["seconds_per_prompt"]
    text += [
        "",
        "Seconds per prompt: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()) + ".",
    ]
    return "\n".join(text)


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
