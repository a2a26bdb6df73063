"""The evaluated model: the engine's model and facts, and batched forwards.

An :class:`EvalModel` is a :class:`engine.DePassEngine` (loaded by the engine's own
loader: a model folder, a hub id or a ``.gguf`` file) with the reads the protocols need:
the shapes are the engine's :class:`engine.info.ModelInfo`, every module is found through
the family's parts (:mod:`engine.families`), so each supported family (GPT-2, GPT-NeoX,
the mixtures of experts...) runs every protocol. The same engine answers the in-process
DePass requests (:class:`depass_eval.source.LocalDePass`).

Every protocol needs the model's own next-token probabilities on many edited prompts
(patched, recovered, masked); :class:`EvalModel` runs them in batches of equal length, so
no padding or attention mask can change a result, and reads only the last position's
logits (``logits_to_keep=1``: the LM head is the largest matrix of a small model).

A neuron is one column of the engine's neuron axis of a layer (``Family.neuron_width``):
a dense MLP's neurons are the input of its output projection; a mixture's are every
expert's, expert by expert, then a shared expert's, each neuron's activation times its
routing weight (zero where its expert was not chosen). :meth:`EvalModel.neuron_hook`
lets a hook read or edit them (B, N, W) on either kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from engine import DePassEngine
from engine.families import Family
from engine.info import ModelInfo
from engine.parts import DenseMLP, FrozenMLP, Hook, MixtureMLP

#: Rows of one batched forward (equal-length prompts); bounds the activation memory.
BATCH_ROWS = 64

#: Reads or edits activations in a hook: (B, N, W) in, the activations to use out (the
#: same tensor to leave them as they are).
Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalModel:
    """A causal LM's DePass engine, with the few reads the protocols need.

    Attributes:
        engine: the engine on the model (its facts, family, tokenizer; in-process DePass).
        name: what reports call the model.
    """

    engine: DePassEngine
    name: str

    def __post_init__(self) -> None:
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)  # gradients are taken w.r.t. activations only

    @classmethod
    def load(cls, spec: str, threads: int | None = None, name: str | None = None) -> EvalModel:
        """The model of a model folder, a hub id or a ``.gguf`` file (dequantised once and
        cached as safetensors), loaded by the engine's loader in float32 with eager
        attention (what the engine reads); ``name`` defaults to the spec's last part."""
        if threads:
            torch.set_num_threads(threads)
        return cls(DePassEngine.from_pretrained(spec), name or Path(spec).name)

    @classmethod
    def of(cls, model: nn.Module, tokenizer: Any, name: str) -> EvalModel:
        """An already loaded model and its tokenizer, with an engine on them."""
        return cls(DePassEngine(model, tokenizer), name)

    # ------------------------------------------------------------------ facts

    @property
    def model(self) -> nn.Module:
        return self.engine.model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def info(self) -> ModelInfo:
        """The engine's shape facts (read from the weights, whatever the config calls them)."""
        return self.engine.info

    @property
    def family(self) -> Family:
        """The model's family, its layout decided for this config."""
        return self.engine.family

    @property
    def num_layers(self) -> int:
        return self.info.num_layers

    @property
    def num_heads(self) -> int:
        return self.info.num_heads

    @property
    def head_dim(self) -> int:
        return self.info.head_dim

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    def neuron_width(self, layer: int) -> int:
        """Neurons of ``layer``'s MLP (a mixture's: every expert's, then a shared one's)."""
        return self.family.neuron_width(self.model, layer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ tokens

    def encode(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as the engine tokenizes it (special tokens included)."""
        return self.engine.tokenize(prompt)

    def answer_id(self, answer: str) -> int:
        """The first token of the answer as it follows the prompt (a leading space)."""
        text = answer if answer.startswith(" ") else " " + answer
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"the answer {answer!r} tokenizes to nothing")
        return int(ids[0])

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    # ------------------------------------------------------------------ forwards

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, V) next-token logits of each prompt, batched by length."""
        out = torch.empty(len(prompts), self.info.vocab_size)
        with torch.inference_mode():
            for indices, batch in _length_batches(prompts):
                ids = torch.tensor(batch, device=self.device)
                logits = self.model(input_ids=ids, logits_to_keep=1).logits[:, -1]
                out[indices] = logits.float().cpu()
        return out

    def answer_probs(self, prompts: Sequence[Sequence[int]], answer: int) -> torch.Tensor:
        """(B,) probability of token ``answer`` after each prompt."""
        return torch.softmax(self.last_logits(prompts), dim=-1)[:, answer]

    def residual(self, prompts: Sequence[Sequence[int]], layer: int) -> torch.Tensor:
        """(B, D) residual entering ``layer`` at each prompt's last position.

        Runs the layers below ``layer`` only (a hook stops the forward there).
        """
        out = torch.empty(len(prompts), self.hidden_size)
        with torch.inference_mode():
            for indices, batch in _length_batches(prompts):
                ids = torch.tensor(batch, device=self.device)
                out[indices] = self._residual_batch(ids, layer)[:, -1].float().cpu()
        return out

    def residual_all(self, ids: Sequence[int], layer: int) -> torch.Tensor:
        """(N, D) residual entering ``layer`` at every position of one prompt."""
        with torch.inference_mode():
            batch = torch.tensor([list(ids)], device=self.device)
            return self._residual_batch(batch, layer)[0].float().cpu()

    def residuals_at(self, prompts: Sequence[Sequence[int]], layers: Sequence[int]) -> torch.Tensor:
        """(len(layers), B, D) residual entering each of ``layers`` (below the last layer)
        at each prompt's last position, from one forward per batch."""
        if any(not 0 <= layer < self.num_layers for layer in layers):
            raise ValueError(f"layers must be in 0..{self.num_layers - 1}; got {list(layers)}")
        out = torch.empty(len(layers), len(prompts), self.hidden_size)
        with torch.inference_mode():
            for indices, batch in _length_batches(prompts):
                ids = torch.tensor(batch, device=self.device)
                hidden = self.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
                for row, layer in enumerate(layers):
                    out[row, indices] = hidden.hidden_states[layer][:, -1].float().cpu()
        return out

    def residuals_all(self, ids: Sequence[int], layers: Sequence[int]) -> torch.Tensor:
        """(len(layers), N, D) residual entering each of ``layers`` (below the last layer)
        at every position of one prompt, from one forward."""
        if any(not 0 <= layer < self.num_layers for layer in layers):
            raise ValueError(f"layers must be in 0..{self.num_layers - 1}; got {list(layers)}")
        with torch.inference_mode():
            batch = torch.tensor([list(ids)], device=self.device)
            hidden = self.model(input_ids=batch, output_hidden_states=True, logits_to_keep=1)
            return torch.stack([hidden.hidden_states[layer][0] for layer in layers]).float().cpu()

    def greedy(self, prompts: Sequence[Sequence[int]], steps: int) -> list[list[int]]:
        """The ``steps`` greedy next tokens of each prompt (batched by length, no cache)."""
        out: list[list[int]] = [[] for _ in prompts]
        with torch.inference_mode():
            for indices, batch in _length_batches(prompts):
                seqs = torch.tensor(batch, device=self.device)
                for _ in range(steps):
                    logits = self.model(input_ids=seqs, logits_to_keep=1).logits[:, -1]
                    seqs = torch.cat([seqs, logits.argmax(-1, keepdim=True)], dim=1)
                for row, index in enumerate(indices):
                    out[index] = seqs[row, len(batch[0]) :].tolist()
        return out

    # ------------------------------------------------------------------ modules

    def embeddings(self) -> nn.Module:
        """The token embedding module (what ``inputs_embeds`` replaces)."""
        return self.family.embeddings(self.model)

    def unembedding(self) -> nn.Module:
        """The LM head."""
        return self.family.unembed(self.model)

    def block(self, layer: int) -> nn.Module:
        """Decoder layer ``layer``."""
        return self.family.layer(self.model, layer)

    def output_projection(self, layer: int) -> nn.Module:
        """The attention output projection of ``layer`` (its input: the heads, concatenated,
        (B, N, H d_h); its output: the attention's write, (B, N, D))."""
        return self.block(layer).get_submodule(self.family.attention.o_proj)

    def head_hook(self, layer: int, edit: Edit) -> list[RemovableHandle]:
        """Call ``edit`` on ``layer``'s heads, (B, N, H d_h) (the input of the attention
        output projection), in every forward until the handles are removed."""

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (edit(args[0]), *args[1:])

        return [self.output_projection(layer).register_forward_pre_hook(hook)]

    def neuron_columns(self, layer: int) -> torch.Tensor:
        """(D, W) what each neuron of ``layer`` writes per unit of activation: its column
        of the output projection (a mixture's: its expert's, the shared expert's)."""
        block = self.block(layer)
        return self.family.mlp.for_layer(block).output_columns(block)

    def neuron_hook(self, layer: int, edit: Edit) -> list[RemovableHandle]:
        """Call ``edit`` on ``layer``'s neuron activations, (B, N, W) on the engine's
        neuron axis, in every forward until the handles are removed; the MLP then writes
        what ``edit`` returns.

        A dense MLP's neurons are the input of its output projection, edited in place. A
        mixture's are recomputed from its experts' input with the routing the forward
        chose (the engine's :meth:`engine.parts.MixtureMLP.frozen`), handed to ``edit``
        detached (a leaf that takes gradients while they are on), and the MLP's output
        changed by what the edit changed: ``out + (edited - a) @ columns.T``. Either way
        the gradient a kept activation receives is that of the neuron's write.
        """
        block = self.block(layer)
        part = self.family.mlp.for_layer(block)
        if isinstance(part, DenseMLP):  # one projection reads every neuron

            def dense(
                _module: nn.Module, args: tuple[torch.Tensor, ...]
            ) -> tuple[torch.Tensor, ...]:
                return (edit(args[0]), *args[1:])

            return [block.get_submodule(part.down).register_forward_pre_hook(dense)]
        return _mixture_hook(block, part, self.neuron_columns(layer), edit)

    def _residual_batch(self, ids: torch.Tensor, layer: int) -> torch.Tensor:
        """(B, N, D) the residual entering ``layer`` (``layer == L``: leaving the last
        one): the input of that decoder layer, so that whatever the model adds to the
        token embeddings (GPT-2's position embeddings) is in it."""
        captured: list[torch.Tensor] = []

        def stop_before(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        def stop_after(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        if layer < self.num_layers:
            handle = self.block(layer).register_forward_pre_hook(stop_before, with_kwargs=True)
        else:
            handle = self.block(layer - 1).register_forward_hook(stop_after)
        try:
            self.model(input_ids=ids, logits_to_keep=1)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _mixture_hook(
    block: nn.Module, part: MixtureMLP, columns: torch.Tensor, edit: Edit
) -> list[RemovableHandle]:
    """:meth:`EvalModel.neuron_hook` on a mixture of experts: the part's hooks keep what
    its :meth:`~engine.parts.MixtureMLP.frozen` reads (the experts' input and routing),
    and a hook on the whole MLP adds the edit's change to its output."""
    kept: dict[str, Any] = {}
    handles = [_keep(block.get_submodule(hook.path), hook, kept) for hook in part.hooks()]

    def change(_module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> Any:
        batch = (int(args[0].shape[0]), int(args[0].shape[1]))  # (B, N)
        with torch.no_grad():
            frozen = part.frozen(block, kept, batch)
            routes = frozen.routes
            assert routes is not None
            flat = FrozenMLP(
                frozen.gate.flatten(0, 1), frozen.act.flatten(0, 1), routes.flatten(0, 1)
            )
            act = part.on_axis(block, flat).act.view(*batch, -1)  # (B, N, W)
        kept.clear()
        if torch.is_grad_enabled():
            act.requires_grad_(True)
        edited = edit(act)
        if edited is act and not act.requires_grad:
            return out  # nothing changed, nothing to differentiate
        delta = (edited - act.detach()) @ columns.to(act.dtype).T  # (B, N, D)
        return out + delta.to(out.dtype)

    handles.append(block.get_submodule(part.module).register_forward_hook(change))
    return handles


def _keep(module: nn.Module, hook: Hook, kept: dict[str, Any]) -> RemovableHandle:
    """Keep what ``hook`` (a part's declaration) names of ``module``'s call, detached."""

    def detached(value: Any) -> Any:
        return value.detach() if torch.is_tensor(value) else value

    if hook.kind in ("input", "arguments"):

        def before(_module: nn.Module, args: tuple[Any, ...]) -> None:
            kept[hook.key] = (
                tuple(detached(a) for a in args) if hook.kind == "arguments" else detached(args[0])
            )

        return module.register_forward_pre_hook(before)

    def after(_module: nn.Module, _args: Any, output: Any) -> None:
        value = output[0] if isinstance(output, tuple) else output
        if hook.kind == "first_half":
            value = value[..., : value.shape[-1] // 2]
        kept[hook.key] = detached(value)

    return module.register_forward_hook(after)


def _length_batches(
    prompts: Sequence[Sequence[int]],
) -> Iterator[tuple[list[int], list[list[int]]]]:
    """(indices, prompts) of equal length, at most :data:`BATCH_ROWS` per batch."""
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    for indices in by_length.values():
        for start in range(0, len(indices), BATCH_ROWS):
            chunk = indices[start : start + BATCH_ROWS]
            yield chunk, [list(prompts[i]) for i in chunk]
