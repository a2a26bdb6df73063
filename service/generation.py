"""Token-by-token continuation: greedy, or nucleus sampling from a seeded local generator.

A hand-written loop over the model's own forward pass with its KV cache, rather than
``model.generate``: the random generator stays local (no process-wide ``torch.manual_seed``
in a shared service) and the seed is reported so that any sample can be replayed.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from engine import Cancelled


@dataclass(frozen=True)
class Continuation:
    """Generated token ids, why generation stopped, and the seed used (None: greedy)."""

    ids: list[int]
    finish_reason: Literal["length", "stop"]
    seed: int | None


def eos_token_ids(model: nn.Module, tokenizer: Any | None) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    found: set[int] = set()
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    generation_config = getattr(model, "generation_config", None)
    candidates.append(getattr(generation_config, "eos_token_id", None))
    for value in candidates:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, Iterable):
            found.update(int(v) for v in value)
    return found


def continue_ids(
    model: nn.Module,
    input_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Iterable[int] = (),
    should_stop: Callable[[], bool] | None = None,
) -> Continuation:
    """Generate up to ``max_new_tokens`` after ``input_ids``.

    Args:
        temperature: 0 for greedy decoding; above 0, sample from softmax(logits / t).
        top_p: sample from the smallest set of tokens holding this much probability.
        seed: seed of the sampler; drawn at random (and reported) when None.
        stop_ids: stop after any of these tokens (it is kept in the output).
        should_stop: polled before each token, as the engine polls it between layers.

    Raises:
        engine.Cancelled: ``should_stop`` said so.
    """
    device = next(model.parameters()).device
    stops = set(stop_ids)
    generator: torch.Generator | None = None
    if temperature > 0:
        seed = secrets.randbits(63) if seed is None else seed
        generator = torch.Generator(device=device).manual_seed(seed)
    else:
        seed = None
    # transformers renamed the KV-cache argument (``past_key_values`` -> ``cache``) in 5.x
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else None
    cache_name = cache_name or "past_key_values"
    generated: list[int] = []
    past: Any = None
    step = torch.tensor([list(input_ids)], dtype=torch.long, device=device)  # (1, N)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            if should_stop is not None and should_stop():
                raise Cancelled("the generation was cancelled")
            out = model(input_ids=step, use_cache=True, **{cache_name: past})
            past = getattr(out, cache_name)
            token = _pick(out.logits[0, -1].float(), temperature, top_p, generator)  # (V,)
            generated.append(token)
            if token in stops:
                return Continuation(generated, "stop", seed)
            step = torch.tensor([[token]], dtype=torch.long, device=device)
    return Continuation(generated, "length", seed)


def _pick(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """The next token from ``(V,)`` logits.

    In float64, shifted by the largest logit: any finite temperature > 0 gives a valid
    distribution (a tiny one is greedy, a huge one uniform), never NaN.
    """
    if temperature == 0:
        return int(logits.argmax())
    shifted = logits.double() - logits.double().max()  # (V,), <= 0
    probs = torch.softmax(shifted / temperature, dim=-1)  # (V,)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token while the mass before it is under top_p (the first is always kept)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
        choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def top_next_tokens(
    model: nn.Module, input_ids: Sequence[int], positions: Sequence[int], k: int
) -> tuple[list[list[float]], list[list[float]], list[list[int]]]:
    """The ``k`` largest logits after each of ``positions`` (non-negative, in range) of one
    forward pass: their logits, softmax probabilities and token ids, largest first."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)  # (1, N)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, list(positions)].float()  # (P, V)
        probs = torch.softmax(logits, dim=-1)  # (P, V)
        top = logits.topk(min(k, logits.shape[-1]), dim=-1)  # (P, k)
        chosen = probs.gather(-1, top.indices)  # (P, k)
    return top.values.tolist(), chosen.tolist(), top.indices.tolist()
