"""Patch-top and recover-top (paper 4.1.1): delete or keep the top-ranked tokens and
measure how far the answer's probability moves.

The first and last tokens are always kept and never ranked; of the ``n`` tokens between
them, ``ceil(k% * n)`` are deleted (patch) or kept (recover) for each ``k``. The measure
is ``min(|p - p'| / p, 1)``: 0 when the edit leaves the answer's probability as it was,
1 when it moves by 100% or more. A faithful ranking makes patching hurt most and
recovering hurt least.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from depass_eval.model import EvalModel

#: k of the protocol, in percent of the ranked tokens.
PERCENTS: tuple[int, ...] = tuple(range(10, 101, 10))
MODES = ("patch", "recover")


def ranked_middle(scores: np.ndarray) -> list[int]:
    """Positions 1..N-2, most important first (ties: the earlier position first)."""
    middle = np.arange(1, len(scores) - 1)
    order = np.lexsort((middle, -scores[1:-1]))
    return [int(p) for p in middle[order]]


def count_for(percent: int, ranked: int) -> int:
    """How many of ``ranked`` tokens ``percent`` percent is (rounded up)."""
    return min(ranked, math.ceil(percent * ranked / 100 - 1e-9))


def edited(ids: Sequence[int], ranking: Sequence[int], mode: str, count: int) -> tuple[int, ...]:
    """``ids`` with the top ``count`` of ``ranking`` deleted (patch) or alone kept
    (recover), the first and last tokens always kept, order unchanged."""
    top = set(ranking[:count])
    last = len(ids) - 1
    if mode == "patch":
        return tuple(t for i, t in enumerate(ids) if i not in top)
    return tuple(t for i, t in enumerate(ids) if i in (0, last) or i in top)


def relative_change(p: float, q: float) -> float:
    """``min(|p - q| / p, 1)``."""
    return min(abs(p - q) / p, 1.0) if p > 0 else 1.0


def curves(
    model: EvalModel,
    ids: Sequence[int],
    answer: int,
    base_prob: float,
    scores: Mapping[str, np.ndarray],
    percents: Sequence[int] = PERCENTS,
) -> dict[str, dict[str, list[float]]]:
    """``{method: {"patch": [...], "recover": [...], "patch_p": [...], "recover_p": [...]}}``:
    the relative change at each k, and the answer's probability after each edit (whether
    it fell or rose, which the capped relative change does not tell).

    Every distinct edited prompt of all methods runs once, in length-batched forwards.
    """
    plans: dict[str, dict[str, list[tuple[int, ...]]]] = {}
    for method, values in scores.items():
        ranking = ranked_middle(np.asarray(values, dtype=np.float64))
        plans[method] = {
            mode: [edited(ids, ranking, mode, count_for(k, len(ranking))) for k in percents]
            for mode in MODES
        }
    unique = sorted({seq for plan in plans.values() for seqs in plan.values() for seq in seqs})
    unique = [seq for seq in unique if seq != tuple(ids)]
    probs = dict(zip(unique, model.answer_probs(unique, answer).tolist(), strict=True))
    probs[tuple(ids)] = base_prob
    out: dict[str, dict[str, list[float]]] = {}
    for method, plan in plans.items():
        out[method] = {}
        for mode, seqs in plan.items():
            out[method][mode] = [relative_change(base_prob, probs[seq]) for seq in seqs]
            out[method][f"{mode}_p"] = [probs[seq] for seq in seqs]
    return out
