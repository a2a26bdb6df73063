"""Capture what DePass freezes from the model's own forward pass.

One ordinary forward pass runs with removable forward hooks (inside a context manager,
so nothing outlives the call): per layer the residual entering it (``h^l``, a pre-hook on
the layer), the residual after attention (``u^l``, the input of the MLP sub-block's first
module, whatever the family calls it; in a parallel layer ``h^l`` plus the attention
output), and what each of the family's parts freezes: the
attention probabilities ``A`` (eager attention returns them), the MLP's true
pre-activations ``g`` and activations ``a``, and each norm's per-position inverse scale
(from its true input: for a post-norm, the mixer's output). Then the pre-norm final
residual ``h^L``, its normalised value, and the last position's logits before and after
any final soft-cap. Nothing is re-derived: rotary embeddings, masks, sliding windows,
soft-capped attention and q/k norms all stay the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.families import Family
from engine.parts import FrozenMLP, Hook, module_tensor


@dataclass
class LayerTrace:
    """Frozen quantities of one decoder layer (batch axis removed, model dtype)."""

    resid_pre: torch.Tensor  # (N, D) h^l, entering the layer
    resid_mid: torch.Tensor  # (N, D) u^l, after the attention block
    probs: torch.Tensor | None  # (H, N, N) attention probabilities (None: recomputed)
    gate: torch.Tensor  # (N, W) true pre-activations g of the split projection
    act: torch.Tensor  # (N, W) true neuron activations a (the output projection's input)
    # norm role -> (N, 1) float32 inverse scale of that norm's true input
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    # (N, k) a mixture's chosen experts; ``gate`` and ``act`` are then those experts'
    # (slot by slot, W = k I [+ I_s]), which the MLP part puts on its neuron axis
    routes: torch.Tensor | None = None
    # A trace that keeps no probabilities (long prompts): the attention module and the
    # arguments of its call, to run it again for this layer's probabilities on demand.
    attention_call: AttentionCall | None = None

    def attention_probs(self) -> torch.Tensor:
        """(H, N, N) the attention probabilities: kept, or recomputed by the model's own
        attention module from the inputs of its call (the same numbers)."""
        if self.probs is not None:
            return self.probs
        if self.attention_call is None:
            raise RuntimeError("the trace kept neither probabilities nor the attention call")
        return self.attention_call.probs()

    @property
    def frozen_mlp(self) -> FrozenMLP:
        return FrozenMLP(gate=self.gate, act=self.act, routes=self.routes)

    def tensors(self) -> list[torch.Tensor]:
        return [
            self.resid_pre,
            self.resid_mid,
            *([] if self.probs is None else [self.probs]),
            self.gate,
            self.act,
            *self.scales.values(),
            *([] if self.routes is None else [self.routes]),
        ]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LayerTrace:
        """The trace with ``fn`` applied to every tensor (a kept-probabilities trace)."""
        assert self.probs is not None, "only traces that keep probabilities are mapped"
        return LayerTrace(
            resid_pre=fn(self.resid_pre),
            resid_mid=fn(self.resid_mid),
            probs=fn(self.probs),
            gate=fn(self.gate),
            act=fn(self.act),
            scales={role: fn(t) for role, t in self.scales.items()},
            routes=None if self.routes is None else fn(self.routes),
        )


@dataclass
class AttentionCall:
    """One call of a layer's attention module (one prompt): the module and its inputs,
    kept instead of its (H, N, N) probabilities; the mask and rotary tensors are the
    ones the model shares between layers, so they are held once."""

    module: nn.Module
    args: tuple
    kwargs: dict

    def probs(self) -> torch.Tensor:
        """(H, N, N) the probabilities this call returns."""
        with torch.no_grad():
            output = self.module(*self.args, **self.kwargs)
        return _kept("output[1]", output)[0]


@dataclass
class ForwardTrace:
    """Everything one forward pass of one prompt leaves for the decomposition."""

    input_ids: torch.Tensor  # (N,)
    layers: list[LayerTrace]
    resid_final: torch.Tensor  # (N, D) h^L, before the final norm
    normed_final: torch.Tensor  # (N, D) output of the final norm
    last_logits: torch.Tensor  # (V,) the unembedding's logits at the last position (pre-cap)
    last_output_logits: torch.Tensor | None = None  # (V,) the model's, after a soft-cap

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def resid(self, layer: int) -> torch.Tensor:
        """Residual entering ``layer`` (``layer == L``: the pre-norm final residual)."""
        return self.resid_final if layer == len(self.layers) else self.layers[layer].resid_pre

    def nbytes(self) -> int:
        """Memory held by the trace, for cache accounting."""
        tensors = [self.input_ids, self.resid_final, self.normed_final, self.last_logits]
        if self.last_output_logits is not None:
            tensors.append(self.last_output_logits)
        for layer in self.layers:
            tensors += layer.tensors()
        return sum(t.numel() * t.element_size() for t in tensors)


@contextmanager
def _hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _kept(kind: str, output: Any) -> torch.Tensor:
    """What a :class:`engine.parts.Hook` of ``kind`` keeps of a module's output (a tensor,
    or a tuple whose first element is one)."""
    if kind == "output[1]":
        value = output[1]
        if value is None:
            raise RuntimeError(
                "the attention module returned no probabilities: load the model with "
                "attn_implementation='eager'"
            )
        return value
    value = output[0] if isinstance(output, tuple) else output
    if kind == "first_half":
        return value[..., : value.shape[-1] // 2]
    return value


def install_hooks(
    model: nn.Module,
    family: Family,
    store: dict[tuple[int, str], Any],
    keep_probs: bool = True,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that fill ``store`` with what every part of every layer freezes; key
    ``(layer, name)``, layer ``-1`` for the model root: a tensor, an ``arguments`` hook's
    tuple, or (``keep_probs=False``: the attention probabilities are not kept) the
    attention module's :class:`AttentionCall` (key ``call``)."""
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def on_call(module: nn.Module, key: tuple[int, str]) -> None:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            detach = lambda v: v.detach() if torch.is_tensor(v) else v  # noqa: E731
            kept = {k: detach(v) for k, v in kwargs.items()}
            store[key] = AttentionCall(mod, tuple(detach(a) for a in args), kept)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def on_input(module: nn.Module, key: tuple[int, str], transform=None) -> None:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_input(args, kwargs).detach()
            store[key] = x if transform is None else transform(mod, x)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def on_output(module: nn.Module, key: tuple[int, str], kind: str) -> None:
        def hook(_mod: nn.Module, _args: tuple, output: object) -> None:
            store[key] = _kept(kind, output).detach()

        handles.append(module.register_forward_hook(hook))

    def on_arguments(module: nn.Module, key: tuple[int, str]) -> None:
        def hook(_mod: nn.Module, args: tuple) -> None:
            store[key] = tuple(a.detach() if torch.is_tensor(a) else a for a in args)

        handles.append(module.register_forward_pre_hook(hook))

    def part_hook(layer: nn.Module, index: int, hook: Hook) -> None:
        module = layer.get_submodule(hook.path)
        if hook.key == "probs" and not keep_probs:
            on_call(module, (index, "call"))
        elif hook.kind == "input":
            on_input(module, (index, hook.key))
        elif hook.kind == "arguments":
            on_arguments(module, (index, hook.key))
        else:
            on_output(module, (index, hook.key), hook.kind)

    for index, layer in enumerate(family.decoder_layers(model)):
        on_input(layer, (index, "pre"))
        if family.parallel:  # u^l := h^l + the attention output (no residual holds it)
            on_output(layer.get_submodule(family.attention.module), (index, "attn"), "output")
        else:
            on_input(layer.get_submodule(family.mlp_entry), (index, "mid"))
        for hook in [*family.attention.hooks(), *family.mlp.for_layer(layer).hooks()]:
            part_hook(layer, index, hook)
        for role, part in family.norms():
            on_input(layer.get_submodule(part.path), (index, role), part.inverse_scale)
    final_norm = family.final_norm_module(model)
    on_input(final_norm, (-1, "final"))
    on_output(final_norm, (-1, "normed"), "output")
    on_output(family.unembed(model), (-1, "logits"), "output")
    return handles


def trace_forward_many(
    model: nn.Module, family: Family, prompts: Sequence[torch.Tensor], keep_probs: bool = True
) -> list[ForwardTrace]:
    """Traces of several prompts from one batched forward pass.

    Prompts are left-padded to the longest, with an attention mask that hides the padding
    and position ids that start at 0 on each prompt's first token, so every real position
    computes what it computes alone (up to float rounding in batched products). Each
    trace is cut back to its own positions. One prompt runs as the plain call, unmasked.
    The model must use eager attention, which returns its probabilities.

    ``keep_probs=False`` (one prompt): each layer keeps its attention module's call
    instead of its (H, N, N) probabilities, which :meth:`LayerTrace.attention_probs`
    recomputes one layer at a time (long prompts: the probabilities of every layer
    are most of a trace).
    """
    if not keep_probs and len(prompts) != 1:
        raise ValueError("a trace without probabilities is made for one prompt at a time")
    store: dict[tuple[int, str], Any] = {}
    handles = install_hooks(model, family, store, keep_probs)
    num_layers = len(family.decoder_layers(model))

    device = module_tensor(family.embeddings(model)).device
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
    with _hooks(handles), torch.no_grad():
        output = model(**inputs, use_cache=False, logits_to_keep=1)

    roles = [role for role, _ in family.norms()]
    frozen_mlps = []
    with torch.no_grad():  # a mixture recomputes its experts from what it kept
        for index, layer in enumerate(family.decoder_layers(model)):
            part = family.mlp.for_layer(layer)
            kept = {hook.key: store.pop((index, hook.key)) for hook in part.hooks()}
            frozen_mlps.append(part.frozen(layer, kept, (len(prompts), length)))
    traces = []
    for r, (ids, n) in enumerate(zip(prompts, lengths, strict=True)):
        own = slice(length - n, length)
        pre = [store[(i, "pre")][r, own] for i in range(num_layers)]
        mid = [
            store[(i, "mid")][r, own]
            if (i, "mid") in store
            else pre[i] + store[(i, "attn")][r, own]
            for i in range(num_layers)
        ]
        traces.append(
            ForwardTrace(
                input_ids=ids.detach().cpu(),
                layers=[
                    LayerTrace(
                        resid_pre=pre[i],
                        resid_mid=mid[i],
                        probs=store[(i, "probs")][r, :, own, own] if keep_probs else None,
                        attention_call=None if keep_probs else store[(i, "call")],
                        gate=mlp.gate[r, own],
                        act=mlp.act[r, own],
                        scales={role: store[(i, role)][r, own] for role in roles},
                        routes=None if mlp.routes is None else mlp.routes[r, own],
                    )
                    for i, mlp in enumerate(frozen_mlps)
                ],
                resid_final=store[(-1, "final")][r, own],
                normed_final=store[(-1, "normed")][r, own],
                last_logits=store[(-1, "logits")][r, -1],
                last_output_logits=output.logits.detach()[r, -1],
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
        layers=[layer.map(copy) for layer in trace.layers],
        resid_final=copy(trace.resid_final),
        normed_final=copy(trace.normed_final),
        last_logits=copy(trace.last_logits),
        last_output_logits=None
        if trace.last_output_logits is None
        else copy(trace.last_output_logits),
    )
