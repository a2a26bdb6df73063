"""The route of ``POST /v1/attributions``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.responses import Response

from service.dependencies import serving_of
from service.endpoints.attributions.protocol import AttributionBody, AttributionResponse
from service.endpoints.attributions.serving import AttributionServing
from service.routing import BINARY_RESPONSE, BODY_ERRORS, WORKER_ERRORS, error_responses, v1_router

router = v1_router()
ServingDep = Annotated[AttributionServing, Depends(serving_of(AttributionServing))]


@router.post(
    "/attributions",
    response_model=AttributionResponse,
    responses={**BINARY_RESPONSE, **error_responses(*BODY_ERRORS, *WORKER_ERRORS)},
    summary="Decompose a forward pass into components and score them",
)
async def create_attribution(
    body: AttributionBody, request: Request, serving: ServingDep
) -> Response | Any:
    request.state.granularity = body.granularity
    return await serving.attribute(body, request.headers.get("accept"), request.is_disconnected)
