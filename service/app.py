"""The app factory: lifespan (model load and worker), middleware, and the error handlers.

``create_app(settings, engine)`` builds the whole service; the model is loaded once in the
lifespan (unless a ready engine is passed, as tests do) and kept on ``app.state`` with its
worker and serving layer. Every failure leaves through the handlers registered in
:func:`register_error_handlers`, or the middleware of :mod:`service.middleware`, as the one
envelope ``{"error": {...}}``.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, RedirectResponse

from engine import DePassEngine
from service.api_router import router
from service.docs_pages import add_docs_pages
from service.errors import (
    BadRequestError,
    ServiceError,
    error_response,
    from_http_exception,
    invalid_fields,
)
from service.metrics import Metrics
from service.middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware
from service.serving import FaultInjector, Serving, load_engine
from service.settings import Settings
from service.ui import mount_ui
from service.worker import Worker

logger = logging.getLogger("service")

__version__ = "0.1.0"

DESCRIPTION = """\
DePass attributions over HTTP: decompose a causal LM's forward pass into exact additive
components (tokens, modules, heads, neurons, subspaces) and score each against the logits.

Arrays travel as `{"dtype", "shape", "encoding", "data"}` objects, or as a safetensors file
when `Accept: application/vnd.safetensors`. Every error is `{"error": {"message", "type",
"param", "code"}}`.
"""


def create_app(
    settings: Settings | None = None,
    engine: DePassEngine | None = None,
    *,
    fault_injector: FaultInjector | None = None,
) -> FastAPI:
    """Build the service.

    Args:
        settings: defaults to :class:`Settings` read from the environment.
        engine: a ready engine to serve (tests); None loads ``settings.model`` at start-up.
        fault_injector: a test seam called on the worker thread before each engine call.
    """
    settings = settings or Settings()
    app = FastAPI(
        title="DePass Serve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_lifespan,
        docs_url=None,  # served offline by add_docs_pages
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
    )
    if settings.docs_enabled:
        add_docs_pages(app)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.engine = engine
    app.state.serving = None
    app.state.fault_injector = fault_injector
    app.include_router(router)
    if settings.ui_enabled:
        mount_ui(app)
    add_root_redirect(app, settings)
    register_error_handlers(app)
    # add_middleware wraps: the last one added runs first.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    app.add_middleware(ApiKeyMiddleware, api_key=key, protected=_protected(settings))
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: sees all
    return app


def add_root_redirect(app: FastAPI, settings: Settings) -> None:
    """``/`` redirects to the viewer, or to the API docs when the viewer is off (a 404
    when both are off)."""
    target = "ui/" if settings.ui_enabled else "docs" if settings.docs_enabled else None
    if target is None:
        return

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        # relative, so that it also holds behind a proxy that serves the app under a prefix
        return RedirectResponse(target, status_code=307)


def _protected(settings: Settings) -> Callable[[str], bool]:
    """The paths that need the API key: ``/v1/*``, and ``/metrics`` if so configured."""

    def protected(path: str) -> bool:
        return path.startswith("/v1/") or (settings.protect_metrics and path == "/metrics")

    return protected


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model (unless given), start its worker, and tear both down at exit."""
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    owned = app.state.engine is None
    if owned:
        clock = time.perf_counter()
        app.state.engine = await anyio.to_thread.run_sync(load_engine, settings)
        logger.info("model loaded in %.1f s", time.perf_counter() - clock)
    engine: DePassEngine = app.state.engine
    rates = await anyio.to_thread.run_sync(engine.rates)  # for the time estimates
    logger.info(
        "device rates: %.1f GFLOP/s matrix products, %.0f M/s elementwise",
        rates.matmul / 1e9,
        rates.elementwise / 1e6,
    )
    worker = Worker(
        settings.max_queue,
        on_skip=lambda reason: metrics.skipped.labels(reason).inc(),
        on_stop=lambda reason: metrics.stopped.labels(reason).inc(),
        batch_runner=lambda requests, stop: app.state.serving.attribute_batch(requests, stop),
        max_batch=settings.max_batch,
    )
    worker.start()
    metrics.track_worker(lambda: worker.depth, lambda: float(worker.busy))
    metrics.gpu_peak_memory.set_function(_gpu_peak_bytes)
    metrics.gpu_memory.set_function(_gpu_allocated_bytes)
    app.state.serving = Serving(engine, settings, metrics, worker, app.state.fault_injector)
    metrics.model_loaded.set(1)
    logger.info(
        "DePass Serve ready: model %s (%s, %d layers) on %s; API docs at %s",
        settings.model_name(),
        engine.info.family,
        engine.info.num_layers,
        engine.info.device,
        _docs_url(settings),
    )
    try:
        yield
    finally:
        app.state.serving = None
        metrics.model_loaded.set(0)
        await anyio.to_thread.run_sync(worker.stop, settings.graceful_shutdown_s)
        if owned:
            app.state.engine = None
            del engine
            gc.collect()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()


def _docs_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host else host
    base = f"http://{host}:{settings.port}"
    return f"{base}/docs" if settings.docs_enabled else f"{base} (docs disabled)"


def _gpu_peak_bytes() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return float(torch.cuda.max_memory_allocated())
    return 0.0


def _gpu_allocated_bytes() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return float(torch.cuda.memory_allocated())
    return 0.0


# ---------------------------------------------------------------------------- errors


def register_error_handlers(app: FastAPI) -> None:
    """Route every failure to the envelope: service errors, validation, HTTP, and the rest."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if broken is not None:
            reason = (broken.get("ctx") or {}).get("error", "malformed")
            where = broken.get("loc", ("body", "?"))[-1]
            error: ServiceError = BadRequestError(
                f"the body is not valid JSON: {reason} (at character {where})"
            )
        else:
            body_field = getattr(request.scope.get("route"), "body_field", None)
            model = getattr(getattr(body_field, "field_info", None), "annotation", None)
            is_model = isinstance(model, type) and issubclass(model, BaseModel)
            error = invalid_fields(errors, model if is_model else None)
        return await service_error(request, error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = None
        if exc.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(from_http_exception(exc, message))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Uvicorn logs the traceback; the client gets the envelope, never the trace.
        return error_response(ServiceError("internal server error"))
