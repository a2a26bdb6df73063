"""The evaluated model: loading (folder, hub id or ``.gguf`` file) and batched forwards.

Every protocol needs the model's own next-token probabilities on many edited prompts
(patched, recovered, masked); :class:`EvalModel` runs them in batches of equal length, so
no padding or attention mask can change a result, and reads only the last position's
logits (``logits_to_keep=1``: the LM head is the largest matrix of a small model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine import DePassEngine
from engine.families import Family, family_for
from engine.parts import GatedMLP

#: Rows of one batched forward (equal-length prompts); bounds the activation memory.
BATCH_ROWS = 64


def load_model(spec: str, threads: int | None = None) -> tuple[nn.Module, Any]:
    """Model and tokenizer from a model folder, a hub id or a ``.gguf`` file (dequantised
    once and cached as safetensors by the engine's loader), in float32 with eager
    attention (what the engine reads)."""
    if threads:
        torch.set_num_threads(threads)
    engine = DePassEngine.from_pretrained(spec)
    return engine.model, engine.tokenizer


@dataclass
class EvalModel:
    """A causal LM and its tokenizer, with the few reads the protocols need."""

    model: nn.Module
    tokenizer: Any
    name: str

    def __post_init__(self) -> None:
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)  # gradients are taken w.r.t. activations only
        self.family: Family = family_for(self.model).for_config(self.model.config)
        config = self.model.config
        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        self.hidden_size = int(config.hidden_size)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden_size // self.num_heads)
        self.intermediate_size = int(config.intermediate_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ tokens

    def encode(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as the engine tokenizes it (special tokens included)."""
        return list(self.tokenizer(prompt)["input_ids"])

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
        out = torch.empty(len(prompts), int(self.model.config.vocab_size))
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

    def embeddings(self) -> nn.Module:
        """The token embedding module."""
        return self.family.embeddings(self.model)

    def unembedding(self) -> nn.Module:
        """The LM head."""
        return self.family.unembed(self.model)

    def block(self, layer: int) -> nn.Module:
        """Decoder layer ``layer``."""
        return self.family.layer(self.model, layer)

    def output_projection(self, layer: int) -> nn.Module:
        """The attention output projection of ``layer`` (its input: the heads, concatenated)."""
        return self.block(layer).get_submodule(self.family.attention.o_proj)

    def down_projection(self, layer: int) -> nn.Module:
        """The MLP output projection of ``layer`` (its input: the neuron activations).

        Raises:
            ValueError: the layer's MLP is a mixture of experts (no one projection reads
                all its neurons; neuron masking is not implemented for it).
        """
        block = self.block(layer)
        part = self.family.mlp.for_layer(block)
        if not isinstance(part, GatedMLP):
            raise ValueError(f"layer {layer}'s MLP is a mixture of experts: no neuron masking")
        return block.get_submodule(part.down)

    def _residual_batch(self, ids: torch.Tensor, layer: int) -> torch.Tensor:
        if layer == 0:
            return self.embeddings()(ids)
        block = self.block(layer - 1)
        captured: list[torch.Tensor] = []

        def stop(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = block.register_forward_hook(stop)
        try:
            self.model(input_ids=ids, logits_to_keep=1)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


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
