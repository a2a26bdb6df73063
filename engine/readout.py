"""From propagated components to scores: the frozen read-out (final norm and unembedding
of the family's :class:`engine.parts.Readout` part), the logit lens, conservation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.capture import ForwardTrace
from engine.parts import FrozenNorm, NormPart, module_tensor
from engine.propagate import Snapshot


@dataclass
class View:
    """One snapshot made ready for the result (the remainder in component row 0, as in
    propagation; the result reports it apart)."""

    states: torch.Tensor | None  # (P, M + 1, D), when asked for
    scores: torch.Tensor  # (P, M + 1, T)
    error: float
    relative_error: float


@dataclass(frozen=True)
class TargetHead:
    """The unembedding rows of the scored targets, in the compute dtype: the same targets
    at every position (T, D), or each position's own (P, T, D)."""

    weight: torch.Tensor  # (T, D) or (P, T, D)
    bias: torch.Tensor | None  # (T,) or (P, T)


#: Positions whose full logits are computed at once when finding each one's top-1 token.
TOP_TOKEN_CHUNK = 256


@dataclass(frozen=True)
class FrozenReadout:
    """What reading components out needs of the model: its final norm and unembedding."""

    final_norm: nn.Module
    unembed: nn.Module
    norm: NormPart  # the final norm's kind
    dtype: torch.dtype
    softcap: float | None = None  # the model caps its logits as c tanh(z / c)

    def for_targets(self, targets: list[int]) -> TargetHead:
        """The unembedding rows (and biases) of ``targets``."""
        bias = getattr(self.unembed, "bias", None)
        return TargetHead(
            weight=module_tensor(self.unembed)[targets].to(self.dtype),
            bias=None if bias is None else bias[targets].to(self.dtype),
        )

    def for_position_targets(self, targets: list[list[int]]) -> TargetHead:
        """The unembedding rows of each position's own targets (P lists of T ids)."""
        weight = module_tensor(self.unembed)
        index = torch.tensor(targets, dtype=torch.long, device=weight.device)
        bias = getattr(self.unembed, "bias", None)
        return TargetHead(
            weight=weight[index].to(self.dtype),  # (P, T, D)
            bias=None if bias is None else bias[index].to(self.dtype),
        )

    def top_tokens(self, trace: ForwardTrace, positions: torch.Tensor) -> list[int]:
        """The model's own top-1 next token at each of ``positions`` (the argmax of its
        logits, computed as the forward pass does, a chunk of positions at a time)."""
        weight = module_tensor(self.unembed)
        normed = trace.normed_final[positions.to(trace.normed_final.device)]  # (P, D)
        tops: list[int] = []
        for chunk in normed.split(TOP_TOKEN_CHUNK):
            logits = self.unembed(chunk.to(weight.device, weight.dtype))  # (p, V)
            tops.extend(logits.argmax(-1).tolist())
        return tops

    def view(
        self,
        snap: Snapshot,
        trace: ForwardTrace,
        scaled_output: bool,
        positions: torch.Tensor,
        head: TargetHead,
        keep_states: bool,
    ) -> View:
        """States, scores and conservation (at the kept positions) of one snapshot.

        ``scaled_output``: the snapshot is the model output, so components are multiplied
        by the final norm's frozen scale and compared with the normalised final state.
        Other snapshots stay in the residual's units; their scores read them through the
        final norm frozen at the true residual there (a logit lens that adds up).
        """
        device = snap.values.device
        kept = positions.to(device)
        true = trace.resid(snap.layer).to(device, self.dtype)[kept]  # (P, D)
        gain = self.norm.gain(self.final_norm).to(device, self.dtype)
        inverse = self.norm.inverse_scale(self.final_norm, true).to(self.dtype)
        lens = inverse * gain  # (P, D)
        bias = self.norm.bias(self.final_norm)
        frozen = FrozenNorm(lens, self.norm.centred, None if bias is None else bias.to(lens))
        total = snap.total  # (P, D)
        if scaled_output:
            total = frozen(total, lens)
            if frozen.shift is not None:
                total = total + frozen.shift
            true = trace.normed_final.to(device, self.dtype)[kept]
        error = float((total - true.to(total.device)).abs().max())
        magnitude = max(float(true.abs().max()), torch.finfo(self.dtype).tiny)
        lensed = frozen(snap.values, lens)  # (M + 1, P, D)
        if frozen.shift is not None:  # the norm's bias: the remainder's (row 0)
            lensed[0] += frozen.shift
        weight = head.weight.to(lensed.device)
        if weight.dim() == 2:
            scores = lensed @ weight.T  # (M + 1, P, T)
        else:  # each position's own targets
            scores = torch.einsum("mpd,ptd->mpt", lensed, weight)
        if head.bias is not None:
            scores[0] += head.bias.to(scores.device)
        states = (lensed if scaled_output else snap.values) if keep_states else None
        return View(
            states=None if states is None else states.transpose(0, 1).cpu(),  # (P, M + 1, D)
            scores=scores.transpose(0, 1).cpu(),  # (P, M + 1, T)
            error=error,
            relative_error=error / magnitude,
        )
