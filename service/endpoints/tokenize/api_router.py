"""The route of ``POST /v1/tokenize``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from service.dependencies import serving_of
from service.endpoints.tokenize.protocol import TokenizeBody, TokenizeResponse
from service.endpoints.tokenize.serving import TokenizeServing
from service.routing import BODY_ERRORS, error_responses, v1_router

router = v1_router()
ServingDep = Annotated[TokenizeServing, Depends(serving_of(TokenizeServing))]


@router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    responses=error_responses(*BODY_ERRORS),
    summary="Token ids and texts of a prompt",
)
async def tokenize(body: TokenizeBody, serving: ServingDep) -> TokenizeResponse:
    return await serving.tokenize(body)
