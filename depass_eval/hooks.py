"""Zeroing attention heads and MLP neurons with forward hooks, and gradient x activation
at the same places.

A head's output is its slice of the input of the attention's output projection (the
family's ``o_proj``: Llama's ``self_attn.o_proj``, GPT-2's ``attn.c_proj``, GPT-NeoX's
``attention.dense``); a neuron's output is its activation on the engine's neuron axis
(a dense MLP's down-projection input, ``act(gate) * up``; a mixture's experts', weighted
by their routing: :meth:`depass_eval.model.EvalModel.neuron_hook`). Zeroing there removes
exactly that head's or neuron's write to the residual stream at every position. The hooks
take one mask per batch row, so many maskings of one prompt run as one batched forward,
and are removed when the ``with`` block ends (nothing is patched globally).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from depass_eval.model import BATCH_ROWS, Edit, EvalModel


@contextmanager
def masked(
    model: EvalModel,
    head_keep: torch.Tensor | None,
    neuron_keep: dict[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Inside the block, multiply head outputs by ``head_keep`` (B, L, H) and the neurons
    of layer ``l`` by ``neuron_keep[l]`` (B, W_l); 0 zeroes, 1 keeps. B is the batch size
    of the forwards run inside."""
    handles = []

    def scale(mask: torch.Tensor, repeat: int) -> Edit:
        def edit(x: torch.Tensor) -> torch.Tensor:
            factor = mask.to(x.device, x.dtype).repeat_interleave(repeat, dim=-1)
            return x * factor.view(x.shape[0], 1, -1)

        return edit

    try:
        if head_keep is not None:
            for layer in range(model.num_layers):
                handles += model.head_hook(layer, scale(head_keep[:, layer], model.head_dim))
        for layer, keep in (neuron_keep or {}).items():
            handles += model.neuron_hook(layer, scale(keep, 1))
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
    neurons of ``neuron_layers`` ({layer: (W_l,)}), summed over positions (one backward)."""
    heads: dict[int, torch.Tensor] = {}
    neurons: dict[int, torch.Tensor] = {}
    handles = []
    embed = model.embeddings()
    try:
        for layer in range(model.num_layers):
            handles += model.head_hook(layer, _retained(heads, layer))
        for layer in neuron_layers:
            handles += model.neuron_hook(layer, _retained(neurons, layer))
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


def _retained(store: dict[int, torch.Tensor], layer: int) -> Edit:
    """An edit that changes nothing and keeps the activations, their gradient retained,
    as ``store[layer]``."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        x.retain_grad()
        store[layer] = x
        return x

    return edit


def masked_generate(
    model: EvalModel,
    ids: Sequence[int],
    head_keep: torch.Tensor,
    neuron_keep: dict[int, torch.Tensor],
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation of one prompt under B maskings (as :func:`masked_logits`), the
    masks applied at every position, the generated ones too: the (B, V) logits of the
    first step and the (B, steps) generated tokens."""
    rows = head_keep.shape[0]
    first, tokens = [], []
    with torch.inference_mode():
        for start in range(0, rows, BATCH_ROWS):
            stop = min(rows, start + BATCH_ROWS)
            seqs = torch.tensor([list(ids)] * (stop - start), device=model.device)
            neurons = {layer: keep[start:stop] for layer, keep in neuron_keep.items()}
            with masked(model, head_keep[start:stop], neurons):
                for step in range(steps):
                    logits = model.model(input_ids=seqs, logits_to_keep=1).logits[:, -1].float()
                    if step == 0:
                        first.append(logits.cpu())
                    seqs = torch.cat([seqs, logits.argmax(-1, keepdim=True)], dim=1)
            tokens.append(seqs[:, len(ids) :].cpu())
    return torch.cat(first), torch.cat(tokens)


def paper_component_scores(
    model: EvalModel, ids: Sequence[int], neuron_layers: Sequence[int]
) -> dict[str, Any]:
    """The component baselines of the paper's scripts, at the last position, for the
    cross-entropy of the model's own argmax token (one backward):

    - ``atp-chunk`` / ``norm-chunk`` (L, H): the attention OUTPUT (after ``o_proj``, in
      residual space) cut into H contiguous chunks of D / H; per chunk the sum of
      ``|activation x gradient|``, or the chunk's norm. (A chunk is not a head: ``o_proj``
      mixes the heads; the per-head reading is :func:`gradient_x_activation`.)
    - ``atp`` / ``coef`` / ``norm`` ({layer: (W_l,)}): at the neurons (a dense MLP's
      ``down_proj`` input), ``|activation x gradient|``, ``|activation|`` and the norm of
      the neuron's write, ``|activation| * ||W_down[:, i]||``.
    """
    outputs: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def keep_output(layer: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            output.retain_grad()
            outputs[layer] = output

        return hook

    try:
        for layer in range(model.num_layers):
            handles.append(model.output_projection(layer).register_forward_hook(keep_output(layer)))
        for layer in neuron_layers:
            handles += model.neuron_hook(layer, _retained(inputs, layer))
        with torch.enable_grad():
            embeds = model.embeddings()(torch.tensor([list(ids)], device=model.device)).detach()
            embeds.requires_grad_(True)
            logits = model.model(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1].float()
            loss = torch.nn.functional.cross_entropy(logits[None], logits.argmax()[None])
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()

    def last(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.grad is not None
        return x[0, -1].detach().float().cpu(), x.grad[0, -1].float().cpu()

    heads = model.num_heads
    atp_chunk, norm_chunk = [], []
    for layer in range(model.num_layers):
        out, grad = last(outputs[layer])
        if out.numel() % heads:
            raise ValueError(f"hidden size {out.numel()} is not a multiple of {heads} heads")
        atp_chunk.append((out * grad).abs().view(heads, -1).sum(-1))
        norm_chunk.append(out.view(heads, -1).norm(dim=-1))
    neurons: dict[str, dict[int, torch.Tensor]] = {"atp": {}, "coef": {}, "norm": {}}
    for layer in neuron_layers:
        act, grad = last(inputs[layer])
        columns = model.neuron_columns(layer).detach().float().cpu().norm(dim=0)
        neurons["atp"][layer] = (act * grad).abs()
        neurons["coef"][layer] = act.abs()
        neurons["norm"][layer] = act.abs() * columns
    return {
        "heads": {"atp-chunk": torch.stack(atp_chunk), "norm-chunk": torch.stack(norm_chunk)},
        "neurons": neurons,
    }
