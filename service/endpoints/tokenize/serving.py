"""Serving ``POST /v1/tokenize``: the prompt's token ids and texts (no worker needed)."""

from __future__ import annotations

from service.endpoints.tokenize.protocol import TokenizeBody, TokenizeResponse
from service.serving import Serving


class TokenizeServing(Serving):
    """``POST /v1/tokenize``."""

    async def tokenize(self, body: TokenizeBody) -> TokenizeResponse:
        """The token ids and texts of ``body.prompt``, special tokens included."""
        self.check_input_chars(body)
        ids = await self.call(self.engine.tokenize, body.prompt)
        tokens = await self.call(self.engine.token_texts, ids)
        return TokenizeResponse(input_ids=ids, tokens=tokens, num_tokens=len(ids))
