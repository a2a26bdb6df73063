"""What a granularity sees of the engine: a narrow, read-only view of the loaded model.

Granularities (:mod:`engine.granularity`) check a request's fields against the model,
size their starts and build them; for that they need the model's facts and shapes, its
token texts and one layer's frozen operators, and nothing else of the engine facade
(:class:`engine.engine.DePassEngine` builds the view once and hands it over), so the
facade and its parts do not import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine.capture import ForwardTrace
from engine.families import Family
from engine.info import ModelInfo
from engine.memory import Shape
from engine.propagate import LayerWeights
from engine.tokens import Tokens


@dataclass(frozen=True)
class ModelView:
    """The loaded model as granularities see it.

    Attributes:
        info: the model's facts (layers, heads, widths, vocabulary).
        shape: its element sizes and the family's memory facts (:mod:`engine.memory`).
        compute_dtype: the dtype of the propagated components.
        matmul_dtype: the dtype of the matrix products.
    """

    info: ModelInfo
    shape: Shape
    compute_dtype: torch.dtype
    matmul_dtype: torch.dtype
    _model: nn.Module
    _family: Family
    _tokens: Tokens

    def neuron_width(self, layer: int) -> int:
        """Neurons of ``layer``'s MLP (a mixture's: every expert's, then the shared one's)."""
        return self._family.neuron_width(self._model, layer)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Readable text of each token."""
        return self._tokens.texts(ids)

    def span_text(self, ids: Sequence[int]) -> str:
        """The decoded text of a run of tokens (a token group's label)."""
        return self._tokens.span_text(ids)

    def layer_weights(self, trace: ForwardTrace, layer: int) -> LayerWeights:
        """Layer ``layer``'s frozen operators for the prompt of ``trace`` alone."""
        return LayerWeights(
            self._model, self._family, [trace], layer, self.compute_dtype, self.matmul_dtype
        )

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in the compute dtype."""
        return tensor.to(self.compute_dtype)
