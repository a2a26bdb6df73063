"""Units of the service: settings, start-up errors, the array codec, the worker."""

from __future__ import annotations

import asyncio
import base64
import pickle
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import zstandard

from engine import Cancelled
from service import worker as worker_module
from service.__main__ import main
from service.arrays import ArrayDecodeError, decode_array, encode_array
from service.errors import QueueFullError, RequestTimeoutError
from service.serving import wants_safetensors
from service.settings import DEFAULT_MODEL_DIR, ModelNotFoundError, Settings
from service.worker import Worker

# ---------------------------------------------------------------------------- settings


def test_settings_come_from_depass_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPASS_PORT", "9123")
    monkeypatch.setenv("DEPASS_MAX_QUEUE", "3")
    monkeypatch.setenv("DEPASS_API_KEY", "s3cret-value")
    monkeypatch.setenv("DEPASS_DEVICE", "CUDA:1")
    settings = Settings()
    assert (settings.port, settings.max_queue, settings.device) == (9123, 3, "cuda:1")
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret-value"
    assert "s3cret-value" not in repr(settings)  # the key never shows in logs
    monkeypatch.setenv("DEPASS_API_KEY", "")
    assert Settings().api_key is None
    assert Settings().device_map is None
    monkeypatch.setenv("DEPASS_DEVICE_MAP", "auto")
    assert Settings().device_map == "auto"
    assert Settings().trust_remote_code is False and Settings().host == "127.0.0.1"


def test_default_model_is_the_embedded_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEPASS_MODEL", raising=False)
    settings = Settings()
    assert settings.model == str(DEFAULT_MODEL_DIR)
    assert DEFAULT_MODEL_DIR.parts[-2:] == ("models", "depass-tiny")
    if DEFAULT_MODEL_DIR.exists():
        settings.check_model_source()  # built: nothing to say
    else:
        with pytest.raises(ModelNotFoundError, match="make model"):
            settings.check_model_source()


def test_start_up_fails_clearly_without_a_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEPASS_MODEL", "/nonexistent/model-folder")
    assert main() == 2
    assert "/nonexistent/model-folder" in capsys.readouterr().err
    monkeypatch.setenv("DEPASS_MODEL", "org/some-hub-model")
    Settings().check_model_source()  # hub ids are left to the loader
    monkeypatch.setenv("DEPASS_DEVICE", "gpu")
    assert main() == 2
    assert "device" in capsys.readouterr().err


def test_accept_negotiation() -> None:
    assert wants_safetensors("application/vnd.safetensors")
    assert wants_safetensors("application/json;q=0.5, application/vnd.safetensors")
    assert not wants_safetensors("application/vnd.safetensors;q=0")
    assert not wants_safetensors("application/json")
    assert not wants_safetensors(None)


# ---------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("encoding", ["list", "base64", "zstd+base64"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_arrays_round_trip(encoding: str, dtype: str) -> None:
    array = np.random.default_rng(1).normal(size=(3, 4, 5)).astype(np.float32)
    obj = encode_array(array, encoding, dtype)  # type: ignore[arg-type]
    assert obj["encoding"] == encoding and obj["shape"] == [3, 4, 5] and obj["dtype"] == dtype
    back = decode_array(**obj, max_bytes=10**6)
    np.testing.assert_array_equal(back, array.astype(dtype).astype(np.float32))


def test_auto_encoding_lists_small_arrays_and_compresses_large_ones() -> None:
    assert encode_array(np.zeros(64))["encoding"] == "list"
    assert encode_array(np.zeros(65))["encoding"] == "zstd+base64"


def test_decoding_never_unpickles_and_bounds_sizes() -> None:
    payload = base64.b64encode(pickle.dumps(np.zeros(4, np.float32))).decode()
    with pytest.raises(ArrayDecodeError, match=r"longer|bytes"):
        decode_array(dtype="float32", shape=[4], encoding="base64", data=payload, max_bytes=64)
    bomb = base64.b64encode(zstandard.ZstdCompressor().compress(bytes(50_000_000))).decode()
    with pytest.raises(ArrayDecodeError, match="more than 16"):
        decode_array(dtype="float32", shape=[4], encoding="zstd+base64", data=bomb, max_bytes=64)
    with pytest.raises(ArrayDecodeError, match="limit"):
        decode_array(dtype="float32", shape=[100], encoding="base64", data="", max_bytes=64)
    with pytest.raises(ArrayDecodeError, match="shape"):
        decode_array(dtype="float32", shape=[0], encoding="list", data=[], max_bytes=64)
    with pytest.raises(ArrayDecodeError, match="finite"):
        decode_array(dtype="float64", shape=[1], encoding="list", data=[1e300], max_bytes=64)


# ---------------------------------------------------------------------------- worker


def test_worker_runs_jobs_in_order_and_bounds_its_queue() -> None:
    async def scenario() -> None:
        worker = Worker(max_queue=2)
        worker.start()
        release = threading.Event()
        order: list[int] = []

        def job(i: int) -> int:
            release.wait(10)
            order.append(i)
            return i * 10

        def submit(i: int) -> asyncio.Task:
            return asyncio.create_task(worker.submit(lambda stop: job(i), timeout_s=10))

        tasks = [submit(0)]
        while not worker.busy:  # the first job runs; two more may wait
            await asyncio.sleep(0.01)
        tasks += [submit(1), submit(2)]
        while worker.depth < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError) as caught:
            await worker.submit(lambda stop: 0, timeout_s=10)
        assert caught.value.headers["Retry-After"].isdigit()
        release.set()
        done = await asyncio.gather(*tasks)
        assert [d.value for d in done] == [0, 10, 20] and order == [0, 1, 2]
        assert all(d.queue_s >= 0 and d.run_s >= 0 for d in done)
        worker.stop(5)
        assert not worker._thread.is_alive()

    asyncio.run(scenario())


def test_worker_delivers_job_errors() -> None:
    async def scenario() -> None:
        worker = Worker(max_queue=1)
        worker.start()

        def fail(should_stop: object) -> None:
            raise KeyError("inside")

        with pytest.raises(KeyError):
            await worker.submit(fail, timeout_s=5)
        start = time.monotonic()
        assert (await worker.submit(lambda stop: "ok", timeout_s=5)).value == "ok"
        assert time.monotonic() - start < 1
        worker.stop(5)

    asyncio.run(scenario())


def test_a_job_the_worker_stops_at_its_deadline_is_a_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker may see the deadline before the waiting request does: the job's work
    stops with Cancelled and settles first. That is still the request's timeout (504),
    not an error of the job. Made certain here: the request waits without polling, and
    the event loop is held past the deadline, so the settled job is what it finds."""
    monkeypatch.setattr(worker_module, "POLL_S", 60.0)

    async def scenario() -> None:
        worker = Worker(max_queue=1)
        worker.start()
        stopped: list[float] = []

        def work(should_stop: Callable[[], bool]) -> None:
            while not should_stop():
                time.sleep(0.005)
            stopped.append(time.monotonic())
            raise Cancelled("the attribution was cancelled")

        task = asyncio.create_task(worker.submit(work, timeout_s=0.2))
        await asyncio.sleep(0.01)  # the request now waits on the job
        time.sleep(0.5)  # hold the loop: the worker stops the job and settles it first
        assert stopped
        with pytest.raises(RequestTimeoutError, match=r"timeout of 0\.2 s"):
            await task
        worker.stop(5)

    asyncio.run(scenario())


def test_operations_page_lists_every_setting() -> None:
    """docs/operations.md's table names every DEPASS_* setting (.env.example: tests/deploy)."""
    page = (DEFAULT_MODEL_DIR.parents[1] / "docs" / "operations.md").read_text()
    for name in Settings.model_fields:
        assert f"`DEPASS_{name.upper()}`" in page, name


def test_http_models_are_derived_from_every_engine_field() -> None:
    """The HTTP bodies are built from the engine's dataclasses: every field of
    engine.AttributionRequest (same default), engine.AttributionResult and engine.ModelInfo
    is in its model with the engine's description, and nothing else is but the
    transport fields; a field added to the engine reaches the API with nothing to copy."""
    import dataclasses

    from engine import AttributionRequest, AttributionResult, ModelInfo
    from service.endpoints.attributions.protocol import (
        BODY_WIRE,
        RESPONSE_WIRE,
        AttributionBody,
        AttributionResponse,
    )
    from service.endpoints.model.protocol import ModelResponse

    cases = (
        (AttributionRequest, AttributionBody, {"array_encoding", "array_dtype"}, BODY_WIRE),
        (AttributionResult, AttributionResponse, {"object", "model"}, RESPONSE_WIRE),
        (
            ModelInfo,
            ModelResponse,
            set(ModelResponse.model_fields) - ModelInfo.__dataclass_fields__.keys(),
            {},
        ),
    )
    for source, model, transport, wire in cases:  # wire: fields whose HTTP form differs
        engine_fields = {f.name: f for f in dataclasses.fields(source)}
        assert set(model.model_fields) == set(engine_fields) | transport, model
        for name, field in engine_fields.items():
            info = model.model_fields[name]
            description = field.metadata["description"]
            assert info.description, (model, name)
            assert description in info.description or name in wire, (model, name)
            if model is AttributionBody:  # a request keeps the engine's defaults
                if field.default is not dataclasses.MISSING:
                    assert info.default == field.default, name
                else:
                    assert info.default_factory() == field.default_factory(), name


def test_one_temperature_floor_and_granularity_list() -> None:
    from engine.request import GRANULARITIES, MIN_TEMPERATURE
    from service.endpoints.attributions.protocol import AttributionBody
    from service.endpoints.generate.protocol import GenerateBody

    for model, name in ((AttributionBody, "temperature"), (GenerateBody, "split_temperature")):
        bounds = [m.ge for m in model.model_fields[name].metadata if hasattr(m, "ge")]
        assert bounds == [MIN_TEMPERATURE], (model, bounds)
    schema = AttributionBody.model_json_schema()
    assert tuple(schema["properties"]["granularity"]["enum"]) == GRANULARITIES


def test_every_endpoint_subpackage_is_served() -> None:
    """Each subpackage of service.endpoints is listed in service.api_router.ENDPOINTS (an
    endpoint left out would be silently unserved) and has its routes and bodies."""
    import pkgutil

    import service.endpoints
    from service.api_router import ENDPOINTS

    found = {m.name for m in pkgutil.iter_modules(service.endpoints.__path__) if m.ispkg}
    assert found == set(ENDPOINTS)
    for name in ENDPOINTS:
        modules = {
            m.name for m in pkgutil.iter_modules([f"{service.endpoints.__path__[0]}/{name}"])
        }
        assert {"api_router", "protocol"} <= modules, name
