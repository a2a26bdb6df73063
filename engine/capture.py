"""Capture what DePass freezes from the model's own forward pass.

One ordinary forward pass runs with removable forward hooks (inside a context manager,
so nothing outlives the call): per layer the residual entering it (``h^l``), the residual
after attention (``u^l``), the attention probabilities ``A`` (eager attention returns them),
the true gate pre-activations ``g`` and the MLP activations ``a = act(g) * up``; then the
pre-norm final residual ``h^L``, its normalised value and the logits. Nothing is
re-derived: rotary embeddings, masks, sliding windows and q/k norms all stay the model's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from engine.adapters import ArchitectureAdapter


@dataclass
class LayerTrace:
    """Frozen quantities of one decoder layer (batch axis removed, model dtype)."""

    resid_pre: torch.Tensor  # (N, D) h^l, entering the layer
    resid_mid: torch.Tensor  # (N, D) u^l, after the attention block
    probs: torch.Tensor  # (H, N, N) attention probabilities
    gate: torch.Tensor  # (N, I) true gate pre-activations g
    act: torch.Tensor  # (N, I) true neuron activations a = act(g) * up


@dataclass
class ForwardTrace:
    """Everything one forward pass of one prompt leaves for the decomposition."""

    input_ids: torch.Tensor  # (N,)
    layers: list[LayerTrace]
    resid_final: torch.Tensor  # (N, D) h^L, before the final norm
    normed_final: torch.Tensor  # (N, D) output of the final norm
    last_logits: torch.Tensor  # (V,) logits at the last position

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def resid(self, layer: int) -> torch.Tensor:
        """Residual entering ``layer`` (``layer == L``: the pre-norm final residual)."""
        return self.resid_final if layer == len(self.layers) else self.layers[layer].resid_pre

    def nbytes(self) -> int:
        """Memory held by the trace, for cache accounting."""
        tensors = [self.input_ids, self.resid_final, self.normed_final, self.last_logits]
        for layer in self.layers:
            tensors += [layer.resid_pre, layer.resid_mid, layer.probs, layer.gate, layer.act]
        return sum(t.numel() * t.element_size() for t in tensors)


@contextmanager
def _hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trace_forward_many(
    model: nn.Module, adapter: ArchitectureAdapter, prompts: Sequence[torch.Tensor]
) -> list[ForwardTrace]:
    """Traces of several prompts from one batched forward pass.

    Prompts are left-padded to the longest, with an attention mask that hides the padding
    and position ids that start at 0 on each prompt's first token, so every real position
    computes what it computes alone (up to float rounding in batched products). Each
    trace is cut back to its own positions. One prompt runs as the plain call, unmasked.
    The model must use eager attention, which returns its probabilities.
    """
    store: dict[tuple[int, str], torch.Tensor] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def keep_input(key: tuple[int, str]):
        def hook(_module: nn.Module, args: tuple) -> None:
            store[key] = args[0].detach()

        return hook

    def keep_output(key: tuple[int, str], index: int | None = None):
        def hook(_module: nn.Module, _args: tuple, output) -> None:
            value = output if index is None else output[index]
            if value is None:
                raise RuntimeError(
                    "the attention module returned no probabilities: load the model with "
                    "attn_implementation='eager'"
                )
            store[key] = value.detach()

        return hook

    layers = adapter.decoder_layers(model)
    for idx in range(len(layers)):
        part = lambda role, i=idx: adapter.layer_part(model, i, role)  # noqa: E731
        handles.append(part("input_norm").register_forward_pre_hook(keep_input((idx, "pre"))))
        handles.append(part("attention").register_forward_hook(keep_output((idx, "probs"), 1)))
        handles.append(
            part("post_attention_norm").register_forward_pre_hook(keep_input((idx, "mid")))
        )
        handles.append(part("gate_proj").register_forward_hook(keep_output((idx, "gate"))))
        handles.append(part("down_proj").register_forward_pre_hook(keep_input((idx, "act"))))
    final_norm = adapter.root_part(model, "final_norm")
    handles.append(final_norm.register_forward_pre_hook(keep_input((-1, "final"))))
    handles.append(final_norm.register_forward_hook(keep_output((-1, "normed"))))

    device = adapter.root_part(model, "embed_tokens").weight.device
    lengths = [int(ids.shape[0]) for ids in prompts]
    length = max(lengths)
    batch = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    positions = torch.zeros(len(prompts), length, dtype=torch.long)
    for r, (ids, n) in enumerate(zip(prompts, lengths, strict=True)):
        batch[r, length - n :] = ids
        mask[r, length - n :] = 1
        positions[r, length - n :] = torch.arange(n)
    inputs: dict[str, torch.Tensor] = {"input_ids": batch.to(device)}
    if len(prompts) > 1:  # one prompt: the plain call, with no mask at all
        inputs |= {"attention_mask": mask.to(device), "position_ids": positions.to(device)}
    with _hooks(handles), torch.inference_mode():
        output = model(**inputs, use_cache=False, logits_to_keep=1)

    traces = []
    for r, (ids, n) in enumerate(zip(prompts, lengths, strict=True)):
        own = slice(length - n, length)
        traces.append(
            ForwardTrace(
                input_ids=ids.detach().cpu(),
                layers=[
                    LayerTrace(
                        resid_pre=store[(i, "pre")][r, own],
                        resid_mid=store[(i, "mid")][r, own],
                        probs=store[(i, "probs")][r, :, own, own],
                        gate=store[(i, "gate")][r, own],
                        act=store[(i, "act")][r, own],
                    )
                    for i in range(len(layers))
                ],
                resid_final=store[(-1, "final")][r, own],
                normed_final=store[(-1, "normed")][r, own],
                last_logits=output.logits.detach()[r, -1],
            )
        )
    if len(prompts) > 1:  # each trace owns compact copies, not views of the padded batch
        traces = [_compact(trace) for trace in traces]
    return traces


def _compact(trace: ForwardTrace) -> ForwardTrace:
    """The trace with contiguous copies of its tensors (views would pin the batch)."""
    copy = lambda t: t.contiguous().clone()  # noqa: E731
    return ForwardTrace(
        input_ids=trace.input_ids,
        layers=[
            LayerTrace(
                *(
                    copy(getattr(layer, f))
                    for f in ("resid_pre", "resid_mid", "probs", "gate", "act")
                )
            )
            for layer in trace.layers
        ],
        resid_final=copy(trace.resid_final),
        normed_final=copy(trace.normed_final),
        last_logits=copy(trace.last_logits),
    )
