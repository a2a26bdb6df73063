"""The attribution result returned by :meth:`engine.DePassEngine.attribute`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class AttributionResult:
    """Components of the residual stream at the end of a decomposed forward pass.

    Arrays are CPU tensors in the compute dtype (float32 by default). ``layers`` is set
    when the arrays carry a leading layer axis (``all_layers`` or a list of head layers).
    """

    tokens: list[str]  # (N,) readable text of each input token
    input_ids: list[int]  # (N,)
    # (M,) labels, in the order of the component axis; when they differ by layer (a list
    # of head layers) they leave the layer out ("rest", "H0", ..) and ``layer_components``
    # ([layers,] M) names each layer's ("L3.H0", ..).
    components: list[str]
    layer_components: list[list[str]] | None
    first_positions: list[int]  # (M,) first position where each component exists
    positions: list[int]  # (P,) non-negative positions of the position axis
    targets: list[int]  # (T,) scored token ids at the last returned position
    target_tokens: list[str]  # (T,)
    # (P, T) each position's scored ids and texts: the asked targets at every position,
    # or by default each position's own top-1 next token (T = 1)
    position_targets: list[list[int]]
    position_target_tokens: list[list[str]]
    granularity: str
    mlp_split: str
    end: str  # "output" (final-norm scaled) or "layer e" (residual entering layer e)
    layers: list[int] | None  # leading-axis layers, or None
    states: torch.Tensor | None  # ([layers,] P, M, D) components
    remainder: torch.Tensor | None  # ([layers,] P, D) bias / remainder component
    scores: torch.Tensor | None  # ([layers,] P, M, T) logit contribution of each component
    remainder_scores: torch.Tensor | None  # ([layers,] P, T) the remainder's contribution
    logits: torch.Tensor  # ([layers,] P, T) logit (lens) of each target: scores + remainder
    conservation_error: float  # max |sum(components) + remainder - true state|
    relative_conservation_error: float  # conservation_error / max |true state|
    # The model's final soft-cap c (Gemma 2): it outputs c tanh(z / c), which is not
    # linear, so ``logits`` (and the scores) are the logits z BEFORE the cap; the capped
    # ones are ``capped_logits``. Both None for models without a cap.
    logit_softcap: float | None = None
    capped_logits: torch.Tensor | None = None  # ([layers,] P, T)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    strategy: str = "forward"  # how the scores were computed: "forward" or "reverse"
    # the request's ``top_k``: the component axis holds only the components among the k
    # largest |score| of some position and target (their union, in the original order)
    kept_top_k: int | None = None
    # The first-token rule applied: the request's ``ignore_bos``, or its default for this
    # prompt (on for token runs whose first token is a special token the tokenizer added)
    ignore_bos: bool = False

    def labels(self, layer: int = -1) -> list[str]:
        """The component labels at one index of the layer axis (``components`` without one)."""
        return self.components if self.layer_components is None else self.layer_components[layer]

    def top_components(
        self, k: int = 10, position: int = -1, target: int = 0, layer: int = -1
    ) -> list[tuple[str, float]]:
        """The ``k`` components with the largest score for one position and target.

        Components that do not exist yet at that position (later tokens, exactly 0 there)
        are not ranked. ``position``, ``target`` and ``layer`` index the result's axes.
        """
        if self.scores is None:
            raise ValueError("the result holds no scores; ask for outputs=['scores']")
        scores = self.scores if self.layers is None else self.scores[layer]
        row = scores[position, :, target]
        present = [
            m for m, first in enumerate(self.first_positions) if first <= self.positions[position]
        ]
        order = sorted(present, key=lambda m: -float(row[m]))[:k]
        names = self.labels(layer)
        return [(names[i], float(row[i])) for i in order]

    def keep_top(self, k: int) -> AttributionResult:
        """This result with only the components among the ``k`` largest |score| of some
        position and target (and layer entry), in their original order; the remainder,
        logits and conservation are unchanged."""
        if self.scores is None:
            raise ValueError("top_k selects scores; the result holds none")
        scores = self.scores if self.layers is not None else self.scores[None]
        count = scores.shape[-2]
        if k < count:
            # (layers, P, k, T) -> every component index that is some entry's top-k
            top = scores.abs().topk(k, dim=-2).indices
            kept = torch.unique(top).tolist()
        else:
            kept = list(range(count))
        index = torch.tensor(kept, dtype=torch.long)
        picked = self.scores.index_select(-2, index)
        return replace(
            self,
            components=[self.components[i] for i in kept],
            layer_components=None
            if self.layer_components is None
            else [[names[i] for i in kept] for names in self.layer_components],
            first_positions=[self.first_positions[i] for i in kept],
            scores=picked,
            kept_top_k=k,
        )
