"""The route of ``POST /v1/next_tokens``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from service.dependencies import serving_of
from service.endpoints.next_tokens.protocol import NextTokensBody, NextTokensResponse
from service.endpoints.next_tokens.serving import NextTokensServing
from service.routing import BODY_ERRORS, WORKER_ERRORS, error_responses, v1_router

router = v1_router()
ServingDep = Annotated[NextTokensServing, Depends(serving_of(NextTokensServing))]


@router.post(
    "/next_tokens",
    response_model=NextTokensResponse,
    responses=error_responses(*BODY_ERRORS, *WORKER_ERRORS),
    summary="The model's most likely next tokens at some positions",
)
async def next_tokens(body: NextTokensBody, serving: ServingDep) -> NextTokensResponse:
    return await serving.next_tokens(body)
