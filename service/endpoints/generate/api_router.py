"""The route of ``POST /v1/generate``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.responses import Response

from service.dependencies import serving_of
from service.endpoints.generate.protocol import GenerateBody, GenerateResponse
from service.endpoints.generate.serving import GenerationServing
from service.routing import BINARY_RESPONSE, BODY_ERRORS, WORKER_ERRORS, error_responses, v1_router

router = v1_router()
ServingDep = Annotated[GenerationServing, Depends(serving_of(GenerationServing))]


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**BINARY_RESPONSE, **error_responses(*BODY_ERRORS, *WORKER_ERRORS)},
    summary="Generate tokens and attribute each one to the tokens before it",
)
async def create_generation(
    body: GenerateBody, request: Request, serving: ServingDep
) -> Response | Any:
    request.state.granularity = "token"
    return await serving.generate(body, request.headers.get("accept"), request.is_disconnected)
