"""Reverse mode: every component's ``taylor`` score from one vector-Jacobian product.

Under the ``taylor`` split every frozen step is one linear map, the same for every
component (attention with frozen probabilities, norms with frozen scales, the MLP as
``W_down((W_gate c_hat) * a / g)`` with ``a / g`` frozen, frozen routing), plus a constant
(the biases, the remainder's). From a stage ``s`` to the read-out the network is
``x -> J_s x + b_s``, so the score of component ``c_m`` for target ``t`` at position ``p``
is ``c_m . (J_s^T r_{p,t})``: the gradient of that logit with respect to the state entering
stage ``s``, contracted with the component. :class:`FrozenPass` runs the SAME frozen
operators that carry components in the forward strategy (``LayerWeights.attend``,
``Propagator.mlp_output``) once, on the true state, with autograd on; one backward pass,
batched over the (position, target) cotangents, gives the gradient at every stage a run
starts from. Each granularity turns that gradient into its components' scores
(:meth:`engine.granularity.Granularity.reverse_scores`).

Exactness stays checked: the remainder's score is what the biases add through the same
map (each stage's constant times a scalar gate whose gradient is its contribution), and
the conservation error compares the frozen map's value on the whole true state with the
model's own final state, so a wrong frozen operator still shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint

from engine.capture import ForwardTrace
from engine.propagate import LayerWeights, Propagator, Snapshot
from engine.splits import SplitSpec

if TYPE_CHECKING:
    from engine.readout import FrozenReadout, TargetHead

#: The split every reverse pass uses (the only rule with a reverse form).
TAYLOR = SplitSpec(
    rule="taylor", temperature=1.0, anchor=None, first_token_rule=False, starts_at_zero=True
)


@dataclass
class StageGradients:
    """What one backward pass leaves, for ``K = P x T`` scored logits.

    Attributes:
        at_stage: stage -> (K, N, D) gradient with respect to the state entering it.
        mlp_input: layer -> (K, N, D) gradient through the MLP path alone of a parallel
            layer (what a component entering at its MLP stage also reaches).
        constants: stage -> (K,) what that stage's constant (its biases) adds to each logit.
        readout_bias: (K,) what the read-out adds (final-norm and unembedding biases).
        error, relative_error: conservation of the frozen map's final state.
    """

    at_stage: dict[int, torch.Tensor]
    mlp_input: dict[int, torch.Tensor]
    constants: dict[int, torch.Tensor]
    readout_bias: torch.Tensor
    error: float
    relative_error: float

    def remainder_from(self, stage: int) -> torch.Tensor:
        """(K,) what the biases of stages ``stage..`` and the read-out add to each logit."""
        later = [value for s, value in self.constants.items() if s >= stage]
        return sum(later, self.readout_bias.clone())

    def entering(self, stage: int) -> torch.Tensor:
        """(K, N, D) the gradient for a component that enters the network at ``stage``
        and is read by everything after it (at a parallel layer's MLP stage: the MLP too)."""
        grad = self.at_stage[stage]
        extra = self.mlp_input.get(stage) if stage % 2 else None
        return grad if extra is None else grad + extra

    def scores_of(
        self, values: torch.Tensor, stage: int, entering_rows: Sequence[int] = ()
    ) -> torch.Tensor:
        """(M + 1, K) scores of a start's rows ``values`` (M + 1, N, D) at ``stage``: each
        row's vector times the gradient there (the rows in ``entering_rows``, at a
        parallel layer's MLP stage, also through that MLP)."""
        grad = self.at_stage[stage]  # (K, N, D)
        values = values.to(grad.device, grad.dtype)
        scores = torch.einsum("mnd,knd->mk", values, grad)
        extra = self.mlp_input.get(stage) if stage % 2 else None
        if extra is not None and entering_rows:
            rows = list(entering_rows)
            scores[rows] += torch.einsum("mnd,knd->mk", values[rows], extra)
        return scores


class FrozenPass:
    """The frozen network of one prompt from ``stage0`` to the end, differentiated.

    Args:
        propagator: holds the layer weights and the forward strategy's operators (built
            for this one trace).
        trace: the prompt's forward trace.
        stage0: the first stage any run of the request starts at.
        end_layer: the residual entering this layer is read out (``L``: the output).
    """

    def __init__(
        self, propagator: Propagator, trace: ForwardTrace, stage0: int, end_layer: int
    ) -> None:
        self.propagator = propagator
        self.trace = trace
        self.stage0 = stage0
        self.end_layer = end_layer
        self.parallel = propagator.family.parallel

    def _attention(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The frozen attention block's output for the state ``x`` (N, D). A trace that
        keeps no probabilities recomputes them (:class:`engine.capture.AttentionCall`),
        and the block is checkpointed so that the backward pass recomputes them once more
        instead of holding every layer's: one layer's (H, N, N) at a time."""
        prop = self.propagator

        def attend(state: torch.Tensor) -> torch.Tensor:
            return prop.weights(layer).attend(state[None, None])[0, 0]

        if self.trace.layers[layer].probs is not None:
            return attend(x)
        return torch.utils.checkpoint.checkpoint(attend, x, use_reentrant=False)

    def _split_bias(self, w: LayerWeights, layer: int, zero: torch.Tensor) -> torch.Tensor:
        """(N, D) what the split's pre-activation biases add to the MLP's output (the
        output of a zero input, whose gates are those biases alone); zero without them."""
        if all(block.remainder_bias is None for block in w.neurons.blocks):
            return zero[0, 0]
        with torch.no_grad():
            split = self.propagator.mlp_output(w, zero, slice(None), True, TAYLOR, layer)
        return zero[0, 0] if split is None else split[0, 0]

    def _true_state(self, stage: int) -> torch.Tensor:
        """(N, D) the model's own state entering ``stage``, in the compute dtype."""
        layer = stage // 2
        state = self.trace.resid(layer) if stage % 2 == 0 else self.trace.layers[layer].resid_mid
        return state.to(self.propagator.dtype)

    @torch.enable_grad()
    def gradients(
        self,
        readout: FrozenReadout,
        head: TargetHead,
        positions: torch.Tensor,
        scaled_output: bool,
        stages: Sequence[int],
    ) -> StageGradients:
        """Run the frozen map on the true state, read the targets out at ``positions``,
        and differentiate every (position, target) logit at once.

        ``stages``: the stages whose entering gradient is kept (the runs' starts; more
        cost memory, not time).
        """
        prop = self.propagator
        x = self._true_state(self.stage0).detach().clone().requires_grad_(True)  # (N, D)
        length, hidden = x.shape
        nodes: dict[int, torch.Tensor] = {}
        mlp_nodes: dict[int, torch.Tensor] = {}
        gates: dict[int, torch.Tensor] = {}  # stage -> scalar 1.0: d logit / d gate = bias part
        entering: torch.Tensor | None = None
        if self.parallel and self.stage0 % 2:  # the MLP of this layer reads h^l
            entering = self.trace.resid(self.stage0 // 2).to(x.dtype).detach().clone()
        zero = x.new_zeros(1, 1, length, hidden)
        whole = slice(0, length)
        for stage in range(self.stage0, 2 * self.end_layer):
            prop.check()
            nodes[stage] = x
            layer = stage // 2
            w = prop.weights(layer)
            if stage % 2 == 0:
                if self.parallel:
                    entering = x
                out = self._attention(layer, x)  # (N, D), linear in x
                constant = w.bias_of(w.attn_bias, 0, x)
            else:
                source = x
                if entering is not None:  # its own node: the gradient of the MLP path alone
                    source = entering.clone()
                    if not source.requires_grad:
                        source.requires_grad_(True)
                    mlp_nodes[layer] = source
                split = prop.mlp_output(w, source[None, None], whole, True, TAYLOR, layer, False)
                out = torch.zeros_like(x) if split is None else split[0, 0]
                constant = w.bias_of(w.mlp_bias, 0, x) + self._split_bias(w, layer, zero)
                entering = None
            gates[stage] = gate = x.new_ones(()).requires_grad_(True)
            x = x + out + gate * constant
        end_stage = 2 * self.end_layer
        nodes[end_stage] = x
        kept = positions.to(x.device)
        snap = Snapshot(layer=self.end_layer, values=x[kept][None], total=x[kept].detach())
        view = readout.view(snap, self.trace, scaled_output, positions, head, keep_states=False)
        logits = view.scores[:, 0]  # (P, T): the frozen map's logits, biases included
        flat = logits.reshape(-1)  # (K,)
        count = flat.shape[0]
        wanted = sorted(set(stages))
        inputs = [nodes[s] for s in wanted]
        parallel_layers = [layer for layer in mlp_nodes if 2 * layer + 1 in wanted]
        inputs += [mlp_nodes[layer] for layer in parallel_layers]
        gate_stages = list(gates)
        inputs += [gates[s] for s in gate_stages]
        cotangents = torch.eye(count, dtype=flat.dtype, device=flat.device)
        grads = batched_vjp(flat, inputs, cotangents)
        at_stage = dict(zip(wanted, grads[: len(wanted)], strict=True))
        grads = grads[len(wanted) :]
        mlp_input = dict(zip(parallel_layers, grads[: len(parallel_layers)], strict=True))
        grads = grads[len(parallel_layers) :]
        constants = {s: g.reshape(count) for s, g in zip(gate_stages, grads, strict=True)}
        zero_snap = Snapshot(
            layer=self.end_layer,
            values=x.new_zeros(1, kept.numel(), hidden),
            total=x.new_zeros(kept.numel(), hidden),
        )
        readout_bias = readout.view(zero_snap, self.trace, False, positions, head, False)
        return StageGradients(
            at_stage={s: g.detach() for s, g in at_stage.items()},
            mlp_input={2 * layer + 1: g.detach() for layer, g in mlp_input.items()},
            constants={s: g.detach() for s, g in constants.items()},
            readout_bias=readout_bias.scores[:, 0].reshape(count).detach().to(flat.dtype),
            error=view.error,
            relative_error=view.relative_error,
        )


def batched_vjp(
    output: torch.Tensor, inputs: list[torch.Tensor], cotangents: torch.Tensor
) -> list[torch.Tensor]:
    """Vector-Jacobian products of ``output`` with each of the K ``cotangents``
    (K, *output.shape), with respect to each of ``inputs``: (K, *input.shape) each, from
    one backward pass batched over the cotangents (``is_grads_batched``)."""
    if cotangents.shape[0] == 1:
        grads = torch.autograd.grad(output, inputs, cotangents[0], allow_unused=True)
        grads = tuple(None if g is None else g[None] for g in grads)
    else:
        grads = torch.autograd.grad(
            output, inputs, cotangents, is_grads_batched=True, allow_unused=True
        )
    return [
        x.new_zeros(cotangents.shape[0], *x.shape) if g is None else g
        for g, x in zip(grads, inputs, strict=True)
    ]
