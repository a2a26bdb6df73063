"""The attribution result returned by :meth:`engine.DePassEngine.attribute`.

Each field's meaning is in its ``metadata['description']``: the one schema of the result,
from which the HTTP response of ``POST /v1/attributions`` is derived.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch


def _about(description: str) -> dict[str, Any]:
    """A result field's ``metadata``: its meaning (the HTTP schema's description)."""
    return {"description": description}


@dataclass
class AttributionResult:
    """Components of the residual stream at the end of a decomposed forward pass.

    Arrays are CPU tensors in the compute dtype (float32 by default). ``layers`` is set
    when the arrays carry a leading layer axis (``all_layers`` or a list of head layers).
    """

    tokens: list[str] = field(metadata=_about("(N,) text of each input token."))
    input_ids: list[int] = field(metadata=_about("(N,) input token ids."))
    components: list[str] = field(
        metadata=_about(
            "(M,) component labels, e.g. 'tok[3]:\"Paris\"'; for a list of head "
            "layers without the layer ('H0'), which layer_components adds."
        )
    )
    layer_components: list[list[str]] | None = field(
        metadata=_about(
            "([layers,] M) each layer's component labels ('L3.H0') when they differ "
            "by layer (a list of head layers); null otherwise."
        )
    )
    first_positions: list[int] = field(
        metadata=_about(
            "(M,) the first position where each component exists (a later token "
            "is exactly 0 before it); 0 for all but token components."
        )
    )
    positions: list[int] = field(metadata=_about("(P,) non-negative positions returned."))
    targets: list[int] = field(
        metadata=_about("(T,) token ids scored at the last position returned.")
    )
    target_tokens: list[str] = field(metadata=_about("(T,) text of each target."))
    position_targets: list[list[int]] = field(
        metadata=_about(
            "(P, T) the token ids scored at each position: the asked targets, or "
            "by default each position's own top-1 next token (T = 1)."
        )
    )
    position_target_tokens: list[list[str]] = field(metadata=_about("(P, T) their texts."))
    granularity: str = field(metadata=_about("What the components are."))
    mlp_split: str = field(metadata=_about("MLP split rule used."))
    end: str = field(metadata=_about("'output' (after the final norm) or 'layer e'."))
    layers: list[int] | None = field(metadata=_about("Layers of the leading axis, if any."))
    states: torch.Tensor | None = field(
        metadata=_about("([layers,] P, M, D) components of the state.")
    )
    remainder: torch.Tensor | None = field(
        metadata=_about("([layers,] P, D) the remainder (bias) component of the state.")
    )
    scores: torch.Tensor | None = field(
        metadata=_about("([layers,] P, M, T) logit contribution of each component.")
    )
    remainder_scores: torch.Tensor | None = field(
        metadata=_about("([layers,] P, T) the remainder's (biases') logit contribution.")
    )
    logits: torch.Tensor = field(
        metadata=_about("([layers,] P, T) each target's logit: scores summed + remainder.")
    )
    conservation_error: float = field(
        metadata=_about("max |sum(components) + remainder - true state| (completeness check).")
    )
    relative_conservation_error: float = field(
        metadata=_about("conservation_error / max |true state|.")
    )
    # The cap is not linear, so ``logits`` (and the scores) are the logits z BEFORE it.
    logit_softcap: float | None = field(
        default=None,
        metadata=_about(
            "The model's final soft-cap c (Gemma 2): logits are c tanh(z / c), and "
            "scores add up to the logit z before the cap; null for models without one."
        ),
    )
    capped_logits: torch.Tensor | None = field(
        default=None,
        metadata=_about("([layers,] P, T) c tanh(logits / c), what the model outputs."),
    )
    timings: dict[str, float] = field(
        default_factory=dict,
        metadata=_about(
            "Seconds per phase: forward_s, decompose_s; and batch_size, the requests run "
            "together with this one (1: alone), whose forward and decomposition times are "
            "shared."
        ),
    )
    strategy: Literal["forward", "reverse"] = field(
        default="forward",
        metadata=_about(
            "How the scores were computed: 'forward' (every component carried "
            "through the network) or 'reverse' (every score from one gradient; taylor split)."
        ),
    )
    kept_top_k: int | None = field(
        default=None,
        metadata=_about(
            "The request's top_k: components holds only those among the k largest "
            "|score| of some position and target; null: every component."
        ),
    )
    ignore_bos: bool = field(
        default=False,
        metadata=_about(
            "The first-token rule applied: the request's ignore_bos, or its default "
            "for this prompt (on for token runs whose first token is a special token the "
            "tokenizer added, off otherwise)."
        ),
    )

    def labels(self, layer: int = -1) -> list[str]:
        """The component labels at one index of the layer axis (``components`` without one)."""
        return self.components if self.layer_components is None else self.layer_components[layer]

    def score_row(self, position: int = -1, target: int = 0, layer: int = -1) -> torch.Tensor:
        """(M,) every component's score at one index of the position, target and layer
        axes (components absent at that position score exactly 0)."""
        if self.scores is None:
            raise ValueError("the result holds no scores; ask for outputs=['scores']")
        scores = self.scores if self.layers is None else self.scores[layer]
        return scores[position, :, target]

    def present(self, position: int = -1) -> list[int]:
        """Indices of the components that exist at index ``position`` of ``positions``
        (a later token's component is exactly 0 before its position)."""
        at = self.positions[position]
        return [m for m, first in enumerate(self.first_positions) if first <= at]

    def target(self, position: int = -1, target: int = 0) -> tuple[int, str]:
        """The token id and text scored at index ``position`` of ``positions``."""
        if self.position_targets is None or self.position_target_tokens is None:
            return self.targets[target], self.target_tokens[target]  # the same everywhere
        return (
            self.position_targets[position][target],
            self.position_target_tokens[position][target],
        )

    def top_components(
        self, k: int = 10, position: int = -1, target: int = 0, layer: int = -1
    ) -> list[tuple[str, float]]:
        """The ``k`` components with the largest score for one position and target.

        Components that do not exist yet at that position (later tokens, exactly 0 there)
        are not ranked. ``position``, ``target`` and ``layer`` index the result's axes.
        """
        row = self.score_row(position, target, layer)
        order = sorted(self.present(position), key=lambda m: -float(row[m]))[:k]
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
