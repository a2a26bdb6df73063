"""Patch-top and recover-top (paper 4.1.1): delete or keep the top-ranked tokens and
measure how far the answer's probability moves.

Two sets of rules (:class:`EditRules`), chosen by ``--rules``:

- ``strict`` (the default): the first and last tokens are always kept and never ranked;
  of the ``n`` tokens between them, ``ceil(k% * n)`` are deleted (patch) or kept
  (recover); the edited prompt is the kept token ids, unchanged.
- ``paper`` (as the paper's public scripts run it): the last token, and the first only
  when it is the tokenizer's BOS, are kept and never ranked (SmolLM2 adds no BOS, so its
  first token is ranked); ``max(1, floor(k% * n))`` tokens are deleted or kept; the kept
  ids are decoded to text and the text tokenised again (a deletion can merge words).

The measure is ``min(|p - p'| / p, 1)`` in both: 0 when the edit leaves the answer's
probability as it was, 1 when it moves by 100% or more. A faithful ranking makes
patching hurt most and recovering hurt least.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from depass_eval.model import EvalModel

#: k of the protocol, in percent of the ranked tokens.
PERCENTS: tuple[int, ...] = tuple(range(10, 101, 10))
MODES = ("patch", "recover")


RULES = ("strict", "paper")


def ranked_middle(scores: np.ndarray, first: int = 1) -> list[int]:
    """Positions ``first``..N-2, most important first (ties: the earlier position first)."""
    middle = np.arange(first, len(scores) - 1)
    order = np.lexsort((middle, -scores[first:-1]))
    return [int(p) for p in middle[order]]


def count_for(percent: int, ranked: int) -> int:
    """How many of ``ranked`` tokens ``percent`` percent is (rounded up)."""
    return min(ranked, math.ceil(percent * ranked / 100 - 1e-9))


def edited(ids: Sequence[int], ranking: Sequence[int], mode: str, count: int) -> tuple[int, ...]:
    """``ids`` with the top ``count`` of ``ranking`` deleted (patch) or alone kept
    (recover); the positions ``ranking`` leaves out (the first and last tokens, or the
    last and a BOS) always kept, order unchanged."""
    top = set(ranking[:count])
    if mode == "patch":
        return tuple(t for i, t in enumerate(ids) if i not in top)
    ranked = set(ranking)
    return tuple(t for i, t in enumerate(ids) if i not in ranked or i in top)


def floor_count(percent: int, ranked: int) -> int:
    """The paper's count: ``max(1, int(n * p))``, the floor, at least one (exact integer
    arithmetic: ``int(n * 0.7)`` in floats gives 62 for n = 90)."""
    return max(1, percent * ranked // 100)


@dataclass(frozen=True)
class EditRules:
    """Which tokens a perturbation may rank, how many k% is, and how an edited prompt is
    made: ``strict`` or ``paper`` (module docstring)."""

    mode: str = "strict"

    def __post_init__(self) -> None:
        if self.mode not in RULES:
            raise ValueError(f"rules must be one of {RULES}; got {self.mode!r}")

    def first_rankable(self, ids: Sequence[int], bos_id: int | None) -> int:
        """0 or 1: the first position a method may rank."""
        if self.mode == "strict":
            return 1
        return 1 if bos_id is not None and len(ids) and ids[0] == bos_id else 0

    def ranking(self, ids: Sequence[int], scores: np.ndarray, bos_id: int | None) -> list[int]:
        """The rankable positions, most important first."""
        return ranked_middle(np.asarray(scores, dtype=np.float64), self.first_rankable(ids, bos_id))

    def count(self, percent: int, ranked: int) -> int:
        return count_for(percent, ranked) if self.mode == "strict" else floor_count(percent, ranked)

    def edit(
        self, tokenizer: Any, ids: Sequence[int], ranking: Sequence[int], mode: str, count: int
    ) -> tuple[int, ...]:
        """The edited prompt's ids: the kept ids (strict), or their text tokenised again
        by ``tokenizer`` (paper; a leading BOS is left to the tokenizer, which adds it
        back)."""
        kept = edited(ids, ranking, mode, count)
        if self.mode == "strict":
            return kept
        bos = tokenizer.bos_token_id
        body = kept[1:] if bos is not None and ids[0] == bos else kept
        return tuple(tokenizer(tokenizer.decode(body))["input_ids"])


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
    rules: EditRules = EditRules(),
) -> dict[str, dict[str, list[float]]]:
    """``{method: {"patch": [...], "recover": [...], "patch_p": [...], "recover_p": [...]}}``:
    the relative change at each k, and the answer's probability after each edit (whether
    it fell or rose, which the capped relative change does not tell).

    Every distinct edited prompt of all methods runs once, in length-batched forwards.
    """
    plans: dict[str, dict[str, list[tuple[int, ...]]]] = {}
    bos = model.tokenizer.bos_token_id
    for method, values in scores.items():
        ranking = rules.ranking(ids, values, bos)
        plans[method] = {
            mode: [
                rules.edit(model.tokenizer, ids, ranking, mode, rules.count(k, len(ranking)))
                for k in percents
            ]
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
