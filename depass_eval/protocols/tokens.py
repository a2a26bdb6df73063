"""Protocol 1, token-level output attribution (paper 4.1.1).

Every method ranks the input tokens by their importance for the answer's first token;
patch-top and recover-top (``perturb.py``) then delete or keep the top k% and measure
the relative change of the answer's probability. The summary gives each method's mean
curves and their means over k (AUC): DePass is better where its patch AUC is larger and
its recover AUC smaller than a baseline's.

``rules`` (``--rules``) picks the protocol: ``strict`` (prompts the model answers
correctly, in a seeded order; the first token never ranked; ``ceil`` counts; gradients of
the logit, 16-step integrated gradients) or ``paper`` (every prompt in file order; a
first token ranked unless it is a BOS; floor counts; edits re-tokenised; gradients of the
log-probability, 100-step integrated gradients). Each DePass variant also ranks by its
absolute score (``depass-<rule>-abs``).
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depass_eval import baselines, peers, perturb
from depass_eval.data import load_cases
from depass_eval.model import EvalModel
from depass_eval.report import HIGHER_IS_BETTER, best_first, line_plot, mean, sem, table, verdict
from depass_eval.runner import Context, Timer, run_correct, run_in_order
from depass_eval.source import Split

NAME = "tokens"


def splits_of(options: dict[str, Any]) -> list[Split]:
    """The DePass variants of a run: each split rule, each softmax temperature, the
    first-token rule on and/or off, scoring the answer's logit and/or its margin over the
    runner-up."""
    rules = options.get("splits", ["softmax", "relu", "max", "linear", "taylor"])
    temperatures = options.get("temperatures", [0.1])
    switch = {"on": [True], "off": [False], "both": [True, False]}
    bos = switch[options.get("first_token_rule", "on")]
    against = options.get("margin_against", "runner-up")
    margins = [against if on else None for on in switch[options.get("margin", "off")]]
    variants = []
    for rule in rules:
        for temperature in temperatures if rule == "softmax" else [0.1]:
            variants += [
                Split(rule, temperature, ignore, margin) for ignore in bos for margin in margins
            ]
    return variants


def runner_up(logits: torch.Tensor, answer: int) -> int:
    """The most likely next token other than ``answer`` under ``logits`` (V,)."""
    others = logits.clone()
    others[answer] = float("-inf")
    return int(others.argmax())


def other_name(model: EvalModel, prompt: str, answer: str) -> int:
    """The first token of the prompt's other name: its most frequent capitalised word
    other than the answer (in IOI, the subject, named twice), after a space."""
    words = [w.strip(".,;:!?\"'") for w in prompt.split()]
    names = [w for w in words[1:] if w[:1].isupper() and w != answer.strip()]
    if not names:
        raise ValueError(f"no other name in {prompt!r}")
    return model.answer_id(max(dict.fromkeys(names), key=names.count))


def competitor(
    model: EvalModel, case: dict[str, Any], logits: torch.Tensor, answer: int, kind: str
) -> int:
    """The token a margin score sets the answer against (``Split.margin``); ``logits``:
    the model's next-token logits after the prompt."""
    if kind == "other-name":
        return other_name(model, case["prompt"], case["answer"])
    return runner_up(logits, answer)


def rules_of(options: dict[str, Any]) -> str:
    """``strict`` (the default) or ``paper``."""
    return str(options.get("rules") or "strict")


def baselines_of(options: dict[str, Any]) -> list[str]:
    """The baselines a run asks for; by default the paper's under its rules (no
    occlusion), all of them under the strict rules."""
    wanted = options.get("baselines")
    if wanted is None:
        paper = rules_of(options) == "paper"
        return list(baselines.PAPER_BASELINES if paper else baselines.BASELINES)
    return list(wanted)


def run(ctx: Context, dataset: str, size: int, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate ``size`` prompts of ``dataset`` (strict: screened for correct answers;
    paper: the first ``size`` in file order); the rows. The peers asked for
    (``--peers``) run in their own processes for the whole run, beside this one (not on
    ``--ray`` actors: their processes are local)."""
    names = list(ctx.options.get("peers") or [])
    if names and ctx.fan_out is not None:
        raise ValueError("--peers runs the peers beside this process; leave out --ray")
    sources = "sentence" if dataset == "longra" else "word"
    folder = peers.weights_folder(ctx.model) if names else None
    running_peers: AbstractContextManager[dict[str, peers.PeerProcess]] = (
        peers.started(names, folder, 1) if folder else nullcontext({})
    )
    with running_peers as running:
        work = functools.partial(evaluate, running=running or None, sources=sources)
        if rules_of(ctx.options) == "paper":
            return run_in_order(ctx, load_cases(dataset), size, lambda c: work(ctx, c), progress)
        return run_correct(ctx, load_cases(dataset), size, work, progress)


def peer_scores(
    ctx: Context,
    running: dict[str, peers.PeerProcess],
    case: dict[str, Any],
    ids: list[int],
    answer: int,
    logit: float,
    sources: str,
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, Any]]:
    """Each running peer's token scores, seconds (its worker's) and notes."""
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    notes: dict[str, Any] = {}
    if "attnlrp" in running:
        scores["attnlrp"], seconds["attnlrp"] = peers.token_scores_attnlrp(
            running["attnlrp"], ids, answer, logit
        )
    if "context-cite" in running:
        scores["context-cite"], reply = peers.token_scores_context_cite(
            running["context-cite"],
            ctx.model.tokenizer,
            case["prompt"],
            ids,
            sources,
            seed=ctx.seed,
        )
        seconds["context-cite"] = reply["seconds"]
        notes["context-cite"] = {"response": reply["response"], "sources": len(reply["sources"])}
    return scores, seconds, notes


def evaluate(
    ctx: Context,
    case: dict[str, Any],
    running: dict[str, peers.PeerProcess] | None = None,
    sources: str = "word",
) -> dict[str, Any]:
    """Scores of every method and their patch/recover curves on one prompt."""
    model = ctx.model
    ids = model.encode(case["prompt"])
    answer = model.answer_id(case["answer"])
    logits = model.last_logits([ids])[0]
    prob = float(torch.softmax(logits, dim=-1)[answer])
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    splits = splits_of(ctx.options)
    kinds = {s.margin for s in splits if s.margin is not None}
    others = {kind: competitor(model, case, logits, answer, kind) for kind in kinds}
    for split in splits:
        with Timer() as clock:
            against = None if split.margin is None else others[split.margin]
            scores[split.label] = ctx.depass.token_scores(ids, answer, split, against)
        seconds[split.label] = clock.seconds
    for split in splits:  # the same scores ranked by magnitude: no extra cost
        scores[f"{split.label}-abs"] = np.abs(scores[split.label])
        seconds[f"{split.label}-abs"] = seconds[split.label]
    rules = rules_of(ctx.options)
    wanted = baselines_of(ctx.options)
    settings = baselines.GradientSettings.for_rules(rules, ctx.options.get("ig_steps"))
    ig_delta = None
    if wanted:
        found, took, ig_delta = baselines.baseline_scores(
            model, ids, answer, wanted=wanted, settings=settings
        )
        scores.update({m: found[m] for m in wanted})
        seconds.update({m: took[m] for m in wanted})
    theirs, took, notes = peer_scores(
        ctx, running or {}, case, ids, answer, float(logits[answer]), sources
    )
    scores.update(theirs)
    seconds.update(took)
    with Timer() as clock:
        results = perturb.curves(model, ids, answer, prob, scores, rules=perturb.EditRules(rules))
    return {
        "id": case["id"],
        "prompt": case["prompt"],
        "answer": case["answer"],
        "rules": rules,
        "correct": int(logits.argmax()) == answer,
        "tokens": model.token_texts(ids),
        "answer_prob": prob,
        "margin_against": {kind: model.token_texts([t])[0] for kind, t in others.items()},
        "curves": results,
        "scores": {m: np.round(v.astype(np.float64), 5).tolist() for m, v in scores.items()},
        "seconds": seconds,
        "perturb_seconds": clock.seconds,
        "ig_convergence_delta": ig_delta,
        "peers": notes,
    }


def summarize(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean curves, AUCs (mean over k) with standard errors, seconds per prompt."""
    percents = perturb.PERCENTS
    methods = list(rows[0]["curves"]) if rows else []
    per_method: dict[str, Any] = {}
    for method in methods:
        entry: dict[str, Any] = {}
        for mode in perturb.MODES:
            curves = np.array([row["curves"][method][mode] for row in rows])
            aucs = curves.mean(axis=1)
            entry[mode] = {
                "curve": curves.mean(axis=0).tolist(),
                "auc": mean(aucs),
                "auc_sem": sem(aucs),
            }
        entry["seconds_per_prompt"] = mean([row["seconds"][method] for row in rows])
        if all(f"{perturb.MODES[0]}_p" in row["curves"][method] for row in rows):
            for mode in perturb.MODES:  # how often the edit raised p(answer), k < 100%
                rises = [
                    float(q > row["answer_prob"])
                    for row in rows
                    for q in row["curves"][method][f"{mode}_p"][:-1]
                ]
                entry[mode]["share_raised"] = mean(rises)
        per_method[method] = entry
    return {
        "protocol": NAME,
        "prompts": len(rows),
        "percents": list(percents),
        "mean_tokens": mean([len(row["tokens"]) for row in rows]),
        "mean_answer_prob": mean([row["answer_prob"] for row in rows]),
        "answered_correctly": mean([float(row.get("correct", True)) for row in rows]),
        "methods": per_method,
        "comparison": _comparison(rows, per_method),
    }


def _comparison(rows: list[dict[str, Any]], per_method: dict[str, Any]) -> dict[str, Any]:
    """The best DePass variant and the best baseline on each measure, with the margin
    and the share of prompts on which DePass's default (softmax) beats each baseline."""
    depass = [m for m in per_method if m.startswith("depass")]
    others = [m for m in per_method if not m.startswith("depass")]
    if not depass or not others:
        return {}
    out: dict[str, Any] = {}
    for mode in perturb.MODES:
        best_ours = best_first(per_method, depass, mode)[0]
        best_theirs = best_first(per_method, others, mode)[0]
        ours, theirs = per_method[best_ours][mode]["auc"], per_method[best_theirs][mode]["auc"]
        out[mode] = {
            "best_depass": best_ours,
            "best_depass_auc": ours,
            "best_baseline": best_theirs,
            "best_baseline_auc": theirs,
            "depass_wins": bool(ours > theirs) if HIGHER_IS_BETTER[mode] else bool(ours < theirs),
            "margin": ours - theirs,
        }
    default = "depass-softmax" if "depass-softmax" in per_method else depass[0]
    wins: dict[str, dict[str, float]] = {}
    for other in others:
        wins[other] = {}
        for mode in perturb.MODES:
            a = np.array([np.mean(r["curves"][default][mode]) for r in rows])
            b = np.array([np.mean(r["curves"][other][mode]) for r in rows])
            wins[other][mode] = float(np.mean(a > b) if HIGHER_IS_BETTER[mode] else np.mean(a < b))
    out["default"] = default
    out["default_beats_per_prompt"] = wins
    return out


def markdown(summary: dict[str, Any], title: str) -> str:
    """The summary table: AUCs, seconds per prompt, and the comparison."""
    rows = []
    for method, entry in sorted(summary["methods"].items(), key=lambda kv: -kv[1]["patch"]["auc"]):
        rows.append(
            [
                method,
                entry["patch"]["auc"],
                entry["patch"]["auc_sem"],
                entry["recover"]["auc"],
                entry["recover"]["auc_sem"],
                entry["seconds_per_prompt"],
            ]
        )
    text = [
        f"## {title}",
        "",
        f"{summary['prompts']} prompts ({_which(summary)};"
        f" mean {summary['mean_tokens']:.1f} tokens, mean answer probability"
        f" {summary['mean_answer_prob']:.3f}). AUC = mean relative change of the answer's"
        " probability over k = 10..100%: patch-top higher is better, recover-top lower is"
        " better; sem = standard error over prompts.",
        "",
        table(
            ["method", "patch AUC", "sem", "recover AUC", "sem", "s / prompt"],
            rows,
        ),
    ]
    comparison = summary.get("comparison") or {}
    if comparison:
        text.append("")
    for mode in perturb.MODES:
        if mode not in comparison:
            continue
        c = comparison[mode]
        word = verdict(summary, mode, c["best_depass"], c["best_baseline"])
        how = "within twice the standard error, a gap of" if word == "ties" else "by"
        text.append(
            f"- {mode}-top: best DePass `{c['best_depass']}` {c['best_depass_auc']:.3f} vs best"
            f" baseline `{c['best_baseline']}` {c['best_baseline_auc']:.3f}: DePass {word}"
            f" ({how} {abs(c['margin']):.3f})."
        )
    return "\n".join(text)


def _which(summary: dict[str, Any]) -> str:
    """Which prompts a run scored, in words."""
    correct = summary.get("answered_correctly", 1.0)
    if summary.get("rules") == "paper":
        return f"every prompt in file order, {correct:.0%} answered correctly"
    return "the model answers each correctly"


def plot(summary: dict[str, Any], out_dir: Path, title: str) -> None:
    """``curves.png``: patch-top and recover-top curves, one line per method."""
    x = summary["percents"]
    panels = [
        (
            f"{mode}-top ({'higher' if HIGHER_IS_BETTER[mode] else 'lower'} is better)",
            "relative change of p(answer)",
            {m: (x, e[mode]["curve"]) for m, e in summary["methods"].items()},
        )
        for mode in perturb.MODES
    ]
    line_plot(out_dir / "curves.png", panels, "k (% of tokens)", title)
