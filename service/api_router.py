"""HTTP routes only: each one hands its body to the serving layer.

``/health``, ``/ready`` and ``/metrics`` stay open (``/metrics`` needs the key with
``DEPASS_PROTECT_METRICS``); ``/v1/*`` needs the API key when one is configured. Every
status a route can answer is declared with its model, so that the OpenAPI document is the
contract the fuzz tests hold the service to.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from service.dependencies import ServingDep, bearer_scheme
from service.errors import NotReadyError
from service.metrics import CONTENT_TYPE
from service.protocol import (
    SAFETENSORS_MEDIA_TYPE,
    AttributionBody,
    AttributionResponse,
    ErrorResponse,
    GenerateBody,
    GenerateResponse,
    HealthResponse,
    ModelResponse,
    NextTokensBody,
    NextTokensResponse,
    ReadyResponse,
    TokenizeBody,
    TokenizeResponse,
)
from service.routing import JSONRoute


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "The body is not valid JSON (syntax, not UTF-8, nested too deeply).",
        401: "A key is configured and the bearer token is missing or wrong.",
        413: "The input, the body or the estimated response is over a limit.",
        415: "The body is not declared as `Content-Type: application/json`.",
        422: "A field is invalid (for the API or for the loaded model); `param` names it.",
        429: "The queue is full; retry after `Retry-After` seconds.",
        503: "The model is not loaded, or it ran out of memory on this request.",
        504: "The request passed DEPASS_REQUEST_TIMEOUT_S.",
    }
    return {code: {"model": ErrorResponse, "description": described[code]} for code in codes}


#: What every route with a JSON body may answer besides 200.
_BODY_ERRORS = (400, 413, 415)


_BINARY: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {SAFETENSORS_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        "description": "JSON with encoded arrays; a safetensors file when `Accept` asks for "
        f"`{SAFETENSORS_MEDIA_TYPE}` (the JSON fields in its metadata under 'depass').",
    }
}

router = APIRouter()
v1 = APIRouter(
    prefix="/v1",
    dependencies=[Depends(bearer_scheme)],
    responses=_errors(401, 422, 503),
    tags=["v1"],
    route_class=JSONRoute,
)


@v1.post(
    "/attributions",
    response_model=AttributionResponse,
    responses={**_BINARY, **_errors(*_BODY_ERRORS, 429, 504)},
    summary="Decompose a forward pass into components and score them",
)
async def create_attribution(
    body: AttributionBody, request: Request, serving: ServingDep
) -> Response | Any:
    request.state.granularity = body.granularity
    return await serving.attribute(body, request.headers.get("accept"), request.is_disconnected)


@v1.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**_BINARY, **_errors(*_BODY_ERRORS, 429, 504)},
    summary="Generate tokens and attribute each one to the tokens before it",
)
async def create_generation(
    body: GenerateBody, request: Request, serving: ServingDep
) -> Response | Any:
    request.state.granularity = "token"
    return await serving.generate(body, request.headers.get("accept"), request.is_disconnected)


@v1.post(
    "/tokenize",
    response_model=TokenizeResponse,
    responses=_errors(*_BODY_ERRORS),
    summary="Token ids and texts of a prompt",
)
async def tokenize(body: TokenizeBody, serving: ServingDep) -> TokenizeResponse:
    return await serving.tokenize(body)


@v1.post(
    "/next_tokens",
    response_model=NextTokensResponse,
    responses=_errors(*_BODY_ERRORS, 429, 504),
    summary="The model's most likely next tokens at some positions",
)
async def next_tokens(body: NextTokensBody, serving: ServingDep) -> NextTokensResponse:
    return await serving.next_tokens(body)


@v1.get("/model", response_model=ModelResponse, summary="The loaded model and the limits")
async def model_info(serving: ServingDep) -> ModelResponse:
    return serving.model_card()


@router.get("/health", response_model=HealthResponse, summary="Liveness", tags=["ops"])
async def health() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses=_errors(503),
    summary="Readiness: 503 until the model is loaded",
    tags=["ops"],
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
        **_errors(401),
    },
    summary="Prometheus metrics",
    tags=["ops"],
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


router.include_router(v1)
