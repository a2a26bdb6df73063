"""Serving ``POST /v1/generate``: continue the prompt on the worker, then attribute every
generated token to the tokens before it in one engine call."""

from __future__ import annotations

import functools
import time

import numpy as np
from pydantic import BaseModel
from starlette.responses import Response

from engine import AttributionRequest, AttributionResult
from service.endpoints.generate.protocol import GenerateBody, GenerateResponse
from service.errors import InvalidFieldError
from service.generation import Continuation, continue_ids, eos_token_ids
from service.serving import Disconnected, Payload, Serving, as_numpy
from service.worker import StopCheck


class GenerationServing(Serving):
    """``POST /v1/generate``."""

    @functools.cached_property
    def _stop_ids(self) -> set[int]:
        """The ids that end a generation (the model's and the tokenizer's EOS)."""
        return eos_token_ids(self.engine.model, self.engine.tokenizer)

    async def generate(
        self, body: GenerateBody, accept: str | None, is_disconnected: Disconnected | None
    ) -> Response | BaseModel:
        """Size the longest attribution, generate and attribute on the worker, render."""
        clock = time.perf_counter()
        limit = self.settings.max_new_tokens
        if body.max_new_tokens > limit:
            raise InvalidFieldError(
                f"max_new_tokens: {body.max_new_tokens} is over this service's limit of {limit}",
                param="max_new_tokens",
            )
        prompt_ids = await self.input_ids(body, extra_tokens=body.max_new_tokens - 1)
        # the attribution of every generated token, sized at the most tokens it can have
        longest = AttributionRequest(
            input_ids=prompt_ids + prompt_ids[-1:] * (body.max_new_tokens - 1),
            positions=[-1],
            ignore_bos=body.ignore_bos,
        )
        await self.check_time(await self.call(self.engine.plan, longest), body)
        self.metrics.input_tokens.labels("generate").observe(len(prompt_ids))
        done = await self.submit(
            "generate",
            lambda stop: self._generate_job(body, prompt_ids, stop),
            is_disconnected=is_disconnected,
        )
        self.metrics.queue_wait.observe(done.queue_s)
        continuation, result, generate_s = done.value
        timings = {"queue_s": done.queue_s, "generate_s": generate_s, **result.timings}
        timings["total_s"] = time.perf_counter() - clock
        payload = self._payload(prompt_ids, continuation, result, timings)
        return self.render(payload, body, accept, GenerateResponse)

    def _generate_job(
        self, body: GenerateBody, prompt_ids: list[int], should_stop: StopCheck
    ) -> tuple[Continuation, AttributionResult, float]:
        """Continue the prompt, then attribute every generated token in one engine call:
        positions are the ones before each generated token, targets the generated tokens."""
        clock = time.perf_counter()
        continuation = continue_ids(
            self.engine.model,
            prompt_ids,
            body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop_ids=self._stop_ids if body.stop_at_eos else (),
            should_stop=should_stop,
        )
        generate_s = time.perf_counter() - clock
        generated = continuation.ids
        start = len(prompt_ids) - 1
        request = AttributionRequest(
            input_ids=prompt_ids + generated[:-1],
            granularity="token",
            positions=list(range(start, start + len(generated))),
            targets=list(generated),
            mlp_split=body.mlp_split,
            temperature=body.split_temperature,
            ignore_bos=body.ignore_bos,
            outputs=["scores"],
        )
        return continuation, self.engine.attribute(request, should_stop=should_stop), generate_s

    def _payload(
        self,
        prompt_ids: list[int],
        continuation: Continuation,
        result: AttributionResult,
        timings: dict[str, float],
    ) -> Payload:
        generated = continuation.ids
        g = np.arange(len(generated))
        assert result.scores is not None and result.remainder_scores is not None
        scores = as_numpy(result.scores)[g, :, g]  # (G, M): position i scored on its own target
        tokenizer = self.engine.tokenizer
        texts = self.engine.token_texts(generated)
        text = (
            tokenizer.decode(generated, skip_special_tokens=True)
            if tokenizer is not None
            else "".join(texts)
        )
        fields = {
            "model": self.model_name,
            "text": text,
            "finish_reason": continuation.finish_reason,
            "seed": continuation.seed,
            "prompt_ids": prompt_ids,
            "prompt_tokens": self.engine.token_texts(prompt_ids),
            "generated_ids": generated,
            "generated_tokens": texts,
            "components": result.components,
            "positions": result.positions,
            "conservation_error": result.conservation_error,
            "relative_conservation_error": result.relative_conservation_error,
            "timings": timings,
        }
        arrays = {
            "scores": scores,
            "remainder_scores": as_numpy(result.remainder_scores)[g, g],  # (G,)
            "logits": as_numpy(result.logits)[g, g],  # (G,)
        }
        return Payload(fields, arrays)
