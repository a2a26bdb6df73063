"""Zeroing attention heads and MLP neurons with forward hooks, and gradient x activation
at the same places.

A head's output is its slice of the input of the attention's output projection
(``o_proj``); a neuron's output is its entry of the input of the MLP's down projection
(``down_proj``, the activation ``act(gate) * up``). Zeroing there removes exactly that
head's or neuron's write to the residual stream at every position. The hooks take one mask
per batch row, so many maskings of one prompt run as one batched forward, and are removed
when the ``with`` block ends (nothing is patched globally).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from depass_eval.model import BATCH_ROWS, EvalModel


@contextmanager
def masked(
    model: EvalModel,
    head_keep: torch.Tensor | None,
    neuron_keep: dict[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Inside the block, multiply head outputs by ``head_keep`` (B, L, H) and the neurons
    of layer ``l`` by ``neuron_keep[l]`` (B, I); 0 zeroes, 1 keeps. B is the batch size
    of the forwards run inside."""
    handles = []

    def scale(mask: torch.Tensor, repeat: int) -> Any:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = args[0]
            factor = mask.to(x.dtype).repeat_interleave(repeat, dim=-1)
            return (x * factor.view(x.shape[0], 1, -1), *args[1:])

        return hook

    try:
        if head_keep is not None:
            for layer in range(model.num_layers):
                o_proj = model.output_projection(layer)
                hook = scale(head_keep[:, layer], model.head_dim)
                handles.append(o_proj.register_forward_pre_hook(hook))
        for layer, keep in (neuron_keep or {}).items():
            down = model.down_projection(layer)
            handles.append(down.register_forward_pre_hook(scale(keep, 1)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def masked_logits(
    model: EvalModel,
    ids: Sequence[int],
    head_keep: torch.Tensor,
    neuron_keep: dict[int, torch.Tensor],
) -> torch.Tensor:
    """(B, V) next-token logits of one prompt under B maskings (row b: ``head_keep[b]``,
    ``neuron_keep[l][b]``), :data:`BATCH_ROWS` rows per forward."""
    rows = head_keep.shape[0]
    out = []
    with torch.inference_mode():
        for start in range(0, rows, BATCH_ROWS):
            stop = min(rows, start + BATCH_ROWS)
            batch = torch.tensor([list(ids)] * (stop - start), device=model.device)
            neurons = {layer: keep[start:stop] for layer, keep in neuron_keep.items()}
            with masked(model, head_keep[start:stop], neurons):
                logits = model.model(input_ids=batch, logits_to_keep=1).logits[:, -1]
            out.append(logits.float().cpu())
    return torch.cat(out)


def gradient_x_activation(
    model: EvalModel, ids: Sequence[int], target: int, neuron_layers: Sequence[int]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Gradient x activation of the target's logit at every head output (L, H) and at the
    neurons of ``neuron_layers`` ({layer: (I,)}), summed over positions (one backward)."""
    heads: dict[int, torch.Tensor] = {}
    neurons: dict[int, torch.Tensor] = {}
    handles = []

    def keep(store: dict[int, torch.Tensor], layer: int) -> Any:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            args[0].retain_grad()
            store[layer] = args[0]

        return hook

    embed = model.embeddings()
    try:
        for layer in range(model.num_layers):
            o_proj = model.output_projection(layer)
            handles.append(o_proj.register_forward_pre_hook(keep(heads, layer)))
        for layer in neuron_layers:
            down = model.down_projection(layer)
            handles.append(down.register_forward_pre_hook(keep(neurons, layer)))
        with torch.enable_grad():
            embeds = embed(torch.tensor([list(ids)], device=model.device)).detach()
            embeds.requires_grad_(True)
            logit = model.model(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1, target]
            logit.backward()
    finally:
        for handle in handles:
            handle.remove()

    def score(x: torch.Tensor) -> torch.Tensor:
        assert x.grad is not None
        return (x * x.grad)[0].sum(0).detach().float().cpu()  # over positions

    per_head = torch.stack(
        [
            score(heads[layer]).view(model.num_heads, model.head_dim).sum(-1)
            for layer in sorted(heads)
        ]
    )
    return per_head, {layer: score(x) for layer, x in neurons.items()}
