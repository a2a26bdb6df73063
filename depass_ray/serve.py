"""The service as a Ray Serve deployment: the same FastAPI app, one replica per GPU.

``serve run deploy/serve.yaml`` (or ``deploy/serve-cpu.yaml`` on a laptop) imports
:func:`app_builder` with the config file's ``args``. Each replica builds the app of
:func:`service.create_app` (``@serve.ingress`` with the app built in the replica, so the
model loads there, in the app's own lifespan) and answers exactly as under uvicorn: the
same routes, bodies, errors and ``/metrics`` (each replica's own).

Backpressure stays the service's: every replica's worker queue holds ``max_queue``
requests and answers 429 (the error envelope, ``code: queue_full``, ``Retry-After``)
beyond it, so Serve lets a replica hold that many, the running batch and the probes
(``max_ongoing_requests``). Requests wait at Serve's proxy only while a replica is picked
or when every replica holds its limit, up to as many again (``max_queued_requests``);
past that Serve answers 429 with ``Retry-After`` itself (a plain-text body). Autoscaling
aims at one batch of requests per replica.

Needs the ``ray`` extra (``pip install 'depass-serve[ray]'``); nothing else imports it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from service.app import create_app
from service.settings import Settings

#: Requests a replica takes beyond its queue and running batch: the liveness and
#: readiness probes, /metrics and /v1/model while the queue is full.
PROBE_HEADROOM = 4
#: Retry-After (seconds) of the 429 that Serve's proxy answers when its own queue is full.
PROXY_RETRY_AFTER_S = 5.0


class ServeArgs(BaseModel):
    """The builder's arguments: a Serve config file's ``args`` (``serve run ... k=v``)."""

    model_config = ConfigDict(extra="forbid")

    num_gpus: float = Field(1.0, ge=0, description="GPUs per replica (1: one replica per GPU).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica.")
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (autoscaling).")
    max_replicas: int = Field(1, ge=1, description="Most replicas (autoscaling).")
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Service settings by name (model, device, max_queue...); DEPASS_* "
        "environment variables of the replicas fill the rest.",
    )

    @field_validator("settings")
    @classmethod
    def _known_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(Settings.model_fields))
        if unknown:
            raise ValueError(f"unknown service settings: {', '.join(unknown)}")
        return value


def deployment_options(args: ServeArgs, settings: Settings) -> dict[str, Any]:
    """Serve's options for the deployment, from its arguments and the service's limits."""
    # A replica's own worker refuses (429) past its queue; Serve lets each replica hold
    # that many, the running batch and the probes, so that the worker is what refuses.
    ongoing = settings.max_queue + settings.max_batch + PROBE_HEADROOM
    return {
        "ray_actor_options": {"num_gpus": args.num_gpus, "num_cpus": args.num_cpus},
        "autoscaling_config": {
            "min_replicas": args.min_replicas,
            "max_replicas": max(args.max_replicas, args.min_replicas),
            "target_ongoing_requests": settings.max_batch,
        },
        "max_ongoing_requests": ongoing,
        # Requests wait at the proxy while a replica is being picked (a burst) or while
        # every replica holds its limit; past a replica's worth, Serve answers 429 itself.
        "max_queued_requests": ongoing,
        "backpressure_config": BackpressureConfig(
            status_code=429, retry_after_s=PROXY_RETRY_AFTER_S
        ),
        "health_check_period_s": 10,
    }


@serve.deployment(name="depass")
@serve.ingress()
class DePassDeployment:
    """One replica: the service's app on its own engine, built in the replica."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = Settings(**settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._settings)


def app_builder(args: dict[str, Any]) -> Application:
    """The Serve application of a config file's ``args`` (:class:`ServeArgs`)."""
    parsed = ServeArgs(**args)
    settings = Settings(**parsed.settings)  # checked here, before any replica starts
    options = deployment_options(parsed, settings)
    # serve.deployment made the class a Deployment (which mypy does not see).
    return DePassDeployment.options(**options).bind(parsed.settings)  # type: ignore[attr-defined]
