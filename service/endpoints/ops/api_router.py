"""The open operations routes: ``/health`` (liveness), ``/ready`` (readiness) and
``/metrics`` (Prometheus; needs the key with ``DEPASS_PROTECT_METRICS``)."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from service.dependencies import ServingDep
from service.endpoints.ops.protocol import HealthResponse, ReadyResponse
from service.errors import NotReadyError
from service.metrics import CONTENT_TYPE
from service.routing import error_responses, ops_router

router = ops_router()


@router.get("/health", response_model=HealthResponse, summary="Liveness")
async def health() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses=error_responses(503),
    summary="Readiness: 503 until the model is loaded",
)
async def ready(serving: ServingDep) -> ReadyResponse:
    if not serving.worker.alive:
        raise NotReadyError("the worker is not running; the service is shutting down")
    return ReadyResponse(model=serving.model_name)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
            "description": "Prometheus text format.",
        },
        **error_responses(401),
    },
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
