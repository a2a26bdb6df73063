"""SDK retries and error tree against scripted services (``httpx.MockTransport``)."""

from __future__ import annotations

import email.utils
import time

import httpx
import numpy as np
import pytest

import depass_client as dc
from tests.client.conftest import (
    ATTRIBUTION,
    RecordingAsyncClient,
    RecordingClient,
    Script,
    envelope,
)

OK = httpx.Response(200, json=ATTRIBUTION)


def test_retries_429_honouring_retry_after() -> None:
    script = Script(envelope(429, **{"Retry-After": "3"}), OK)
    client = RecordingClient(script)
    result = client.attribute("a")
    assert result.top_components(1) == [('tok[0]:"<s>"', 0.5)]
    assert len(script.requests) == 2 and client.sleeps == [3.0]


def test_retry_after_as_a_date_and_in_milliseconds() -> None:
    later = email.utils.formatdate(time.time() + 5, usegmt=True)
    client = RecordingClient(Script(envelope(503, **{"Retry-After": later}), OK))
    client.attribute("a")
    assert 3.0 <= client.sleeps[0] <= 5.0
    client = RecordingClient(Script(envelope(429, **{"retry-after-ms": "250"}), OK))
    client.attribute("a")
    assert client.sleeps == [0.25]


def test_retries_5xx_with_capped_exponential_backoff() -> None:
    script = Script(envelope(503), envelope(502), OK)
    client = RecordingClient(script)
    assert client.attribute("a").logits[0, 0] == np.float32(0.25)
    assert len(script.requests) == 3
    first, second = client.sleeps
    assert 0.375 <= first <= 0.5 and 0.75 <= second <= 1.0  # 0.5 * 2**n, jittered down


def test_gives_up_after_max_retries() -> None:
    script = Script(envelope(503, "the model is not loaded yet"))
    client = RecordingClient(script, max_retries=3)
    with pytest.raises(dc.InternalServerError) as caught:
        client.model()
    assert len(script.requests) == 4 and len(client.sleeps) == 3
    assert caught.value.status_code == 503 and caught.value.code == "not_ready"
    assert "not loaded" in str(caught.value)
    huge = Script(envelope(429, **{"Retry-After": "3600"}), OK)  # over a minute: backoff
    client = RecordingClient(huge)
    client.health()
    assert client.sleeps[0] <= 0.5


def test_retries_connection_errors_then_raises() -> None:
    script = Script(httpx.ConnectError("refused"), OK)
    client = RecordingClient(script)
    assert client.attribute("a").tokens == ["<s>", "a"]
    always = Script(httpx.ConnectError("refused"))
    client = RecordingClient(always, max_retries=1)
    with pytest.raises(dc.APIConnectionError) as caught:
        client.tokenize("a")
    assert not isinstance(caught.value, dc.APITimeoutError)
    assert len(always.requests) == 2
    timeouts = Script(httpx.ReadTimeout("slow"))
    with pytest.raises(dc.APITimeoutError):
        RecordingClient(timeouts, max_retries=0).model()


@pytest.mark.parametrize("status", [400, 401, 404, 409, 413, 422])
def test_client_errors_are_not_retried(status: int) -> None:
    script = Script(envelope(status, "bad field", param="start_layer"))
    client = RecordingClient(script)
    with pytest.raises(dc.APIStatusError) as caught:
        client.attribute("a", start_layer=99)
    assert len(script.requests) == 1 and client.sleeps == []
    assert caught.value.param == "start_layer" and caught.value.message == "bad field"


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, dc.BadRequestError),
        (401, dc.AuthenticationError),
        (404, dc.NotFoundError),
        (413, dc.PayloadTooLargeError),
        (422, dc.UnprocessableEntityError),
        (429, dc.RateLimitError),
        (500, dc.InternalServerError),
        (503, dc.InternalServerError),
        (504, dc.ServiceTimeoutError),
        (418, dc.APIStatusError),
    ],
)
def test_error_tree(status: int, cls: type[dc.APIStatusError]) -> None:
    client = RecordingClient(Script(envelope(status)), max_retries=0)
    with pytest.raises(cls) as caught:
        client.model()
    error = caught.value
    assert type(error) is cls
    assert isinstance(error, dc.APIStatusError) and isinstance(error, dc.APIError)
    assert isinstance(error, dc.DePassError) and error.status_code == status
    assert error.response.status_code == status and error.request.url.path == "/v1/model"


def test_error_tree_shape() -> None:
    assert issubclass(dc.APITimeoutError, dc.APIConnectionError)
    assert issubclass(dc.APIConnectionError, dc.APIError)
    assert not issubclass(dc.APIConnectionError, dc.APIStatusError)
    for cls in (dc.BadRequestError, dc.RateLimitError, dc.InternalServerError):
        assert issubclass(cls, dc.APIStatusError)


def test_a_non_envelope_error_body_still_raises() -> None:
    client = RecordingClient(
        Script(httpx.Response(502, text="<html>bad gateway</html>")), max_retries=0
    )
    with pytest.raises(dc.InternalServerError) as caught:
        client.model()
    assert "bad gateway" in caught.value.message and caught.value.param is None


def test_base_url_and_key_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPASS_BASE_URL", "http://from-env:9000/")
    monkeypatch.setenv("DEPASS_API_KEY", "env-key")
    script = Script(OK)
    client = dc.Client(http_client=httpx.Client(transport=httpx.MockTransport(script)))
    client.attribute("a")
    request = script.requests[0]
    assert str(request.url) == "http://from-env:9000/v1/attributions"
    assert request.headers["authorization"] == "Bearer env-key"
    monkeypatch.delenv("DEPASS_BASE_URL")
    monkeypatch.delenv("DEPASS_API_KEY")
    plain = dc.Client(api_key=None)
    assert plain.base_url == "http://127.0.0.1:8000" and plain.api_key is None


def test_request_bodies() -> None:
    script = Script(OK)
    client = RecordingClient(script)
    subspace = np.arange(6, dtype=np.float64).reshape(1, 2, 3)
    client.attribute("a", granularity="subspace", subspace=subspace, binary=True)
    request = script.requests[0]
    assert request.headers["accept"] == "application/vnd.safetensors"
    body = __import__("json").loads(request.content)
    assert body["prompt"] == "a" and body["array_encoding"] in ("zstd+base64", "base64")
    sent = dc._arrays.decode(body["subspace"])  # type: ignore[attr-defined]
    np.testing.assert_array_equal(sent, subspace.astype(np.float32))


@pytest.mark.anyio
async def test_async_retries_and_errors() -> None:
    script = Script(envelope(429, **{"Retry-After": "2"}), httpx.ConnectError("reset"), OK)
    client = RecordingAsyncClient(script)
    result = await client.attribute("a")
    assert result.targets == [7] and len(script.requests) == 3
    assert client.sleeps[0] == 2.0 and 0.75 <= client.sleeps[1] <= 1.0
    unprocessable = Script(envelope(422, "positions: out of range", param="positions"))
    client = RecordingAsyncClient(unprocessable)
    with pytest.raises(dc.UnprocessableEntityError) as caught:
        await client.attribute("a", positions=[9])
    assert caught.value.param == "positions" and len(unprocessable.requests) == 1
    failing = Script(envelope(502))
    client = RecordingAsyncClient(failing, max_retries=2)
    with pytest.raises(dc.InternalServerError):
        await client.model()
    assert len(failing.requests) == 3
    deadline = Script(envelope(504, **{"x-should-retry": "false"}))
    with pytest.raises(dc.ServiceTimeoutError):
        await RecordingAsyncClient(deadline).attribute("a")
    assert len(deadline.requests) == 1
    with pytest.raises(dc.APITimeoutError):
        await RecordingAsyncClient(Script(httpx.ConnectTimeout("slow")), max_retries=0).health()


#: The retry table: each failed first attempt, and whether the SDK sends the request again.
RETRY_TABLE = [
    (httpx.ConnectError("refused"), True),
    (httpx.ConnectTimeout("slow to connect"), True),
    (httpx.PoolTimeout("no free connection"), True),
    (httpx.RemoteProtocolError("server disconnected"), True),
    (httpx.ReadTimeout("slow answer"), False),  # the service may still be working on it
    (envelope(429, **{"Retry-After": "1"}), True),
    (envelope(502), True),
    (envelope(503, **{"x-should-retry": "true"}), True),  # not ready
    (envelope(503), True),
    (envelope(503, **{"x-should-retry": "false"}), False),  # out of memory
    (envelope(504, **{"x-should-retry": "false"}), False),  # the service's own deadline
    (envelope(504), False),
    (envelope(500), False),
    (envelope(408), False),
    (envelope(422, **{"x-should-retry": "true"}), True),  # the service's word wins
    (envelope(400), False),
]


@pytest.mark.parametrize(("reply", "retried"), RETRY_TABLE, ids=lambda v: repr(v)[:40])
def test_the_retry_table(reply: httpx.Response | Exception, retried: bool) -> None:
    script = Script(reply, OK)
    client = RecordingClient(script)
    if retried:
        assert client.attribute("a").targets == [7]
        assert len(script.requests) == 2 and len(client.sleeps) == 1
    else:
        with pytest.raises(dc.APIError):
            client.attribute("a")
        assert len(script.requests) == 1 and client.sleeps == []


@pytest.mark.anyio
@pytest.mark.parametrize(("reply", "retried"), RETRY_TABLE, ids=lambda v: repr(v)[:40])
async def test_the_async_client_follows_the_same_table(
    reply: httpx.Response | Exception, retried: bool
) -> None:
    script = Script(reply, OK)
    client = RecordingAsyncClient(script)
    if retried:
        assert (await client.attribute("a")).targets == [7]
    else:
        with pytest.raises(dc.APIError):
            await client.attribute("a")
    assert len(script.requests) == 1 + retried


def test_timeouts_raise_timeout_errors_naming_the_url() -> None:
    server = RecordingClient(Script(envelope(504, "the request took longer than 2 s")))
    with pytest.raises(dc.ServiceTimeoutError) as caught:
        server.attribute("a")
    assert caught.value.status_code == 504 and "longer than 2 s" in str(caught.value)
    local = RecordingClient(Script(httpx.ReadTimeout("timed out")))
    with pytest.raises(dc.APITimeoutError) as timed_out:
        local.attribute("a")
    assert "http://depass.test/v1/attributions" in str(timed_out.value)
    refused = RecordingClient(Script(httpx.ConnectError("refused")), max_retries=0)
    with pytest.raises(dc.APIConnectionError) as unreachable:
        refused.model()
    assert "http://depass.test/v1/model" in str(unreachable.value)
    assert "refused" in str(unreachable.value)


def test_the_policy_is_one_object_without_io() -> None:
    policy = dc.RetryPolicy(max_retries=1)
    assert policy.delay(0, envelope(429, **{"Retry-After": "2"})) == 2.0
    assert policy.delay(1, envelope(429)) is None  # out of retries
    assert policy.delay(0, error=httpx.ReadTimeout("slow")) is None
    assert 0.375 <= policy.delay(0, error=httpx.ConnectError("x")) <= 0.5
    assert RecordingClient(Script(OK)).retry_policy == dc.RetryPolicy()
    with pytest.raises(ValueError):
        dc.RetryPolicy(max_retries=-1)


def test_attribute_many_suggests_one_multi_layer_head_request() -> None:
    script = Script(OK)
    client = RecordingClient(script)
    same = [{"prompt": "a", "granularity": "head", "start_layer": n} for n in (2, 0, 1)]
    with pytest.warns(UserWarning, match=r"start_layer=\[0, 1, 2\]"):
        client.attribute_many(same, progress=False)
    assert len(script.requests) == 3
    other = [{"prompt": p, "granularity": "head", "start_layer": 1} for p in ("a", "b")]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client.attribute_many(other, progress=False)  # different prompts: no hint
