"""Serving ``POST /v1/next_tokens``: one forward pass on the worker, the ``top_k`` logits
at each asked position."""

from __future__ import annotations

from service.endpoints.next_tokens.protocol import NextToken, NextTokensBody, NextTokensResponse
from service.errors import InvalidFieldError
from service.generation import top_next_tokens
from service.serving import Serving


class NextTokensServing(Serving):
    """``POST /v1/next_tokens``."""

    async def next_tokens(self, body: NextTokensBody) -> NextTokensResponse:
        """The ``top_k`` most likely next tokens after each asked position."""
        ids = await self.input_ids(body)
        positions = []
        for position in body.positions:
            if not -len(ids) <= position < len(ids):
                raise InvalidFieldError(
                    f"positions: {position} is outside the input's {len(ids)} tokens",
                    param="positions",
                )
            positions.append(position % len(ids))
        model, k = self.engine.model, body.top_k
        done = await self.submit(
            "next_tokens", lambda stop: top_next_tokens(model, ids, positions, k)
        )
        logits, probs, top_ids = done.value
        texts = self.engine.token_texts(ids)
        predictions = [
            [
                NextToken(id=i, token=t, logit=float(logit), probability=float(p))
                for i, t, logit, p in zip(
                    row, self.engine.token_texts(row), logits[r], probs[r], strict=True
                )
            ]
            for r, row in enumerate(top_ids)
        ]
        return NextTokensResponse(
            model=self.model_name,
            tokens=texts,
            input_ids=ids,
            positions=positions,
            predictions=predictions,
        )
