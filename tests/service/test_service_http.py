"""The real service under uvicorn, called through the SDK over real HTTP.

Arrays must arrive bit-exact in float32 (compared with the engine called directly on the
same model folder in this process), as float16 and as lists on request, and in the
safetensors body; the golden tiny Llama must match the reference through HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from depass_client import (
    AsyncClient,
    Attribution,
    Client,
    Generation,
    PayloadTooLargeError,
    UnprocessableEntityError,
)
from engine import AttributionRequest, DePassEngine
from tests.service.conftest import GOLDEN, PROMPT

ARRAYS = ("scores", "remainder_scores", "states", "remainder", "logits")

REQUESTS: dict[str, dict[str, Any]] = {
    "token": {},
    "token-groups": {"groups": [[1, 2], [4]], "positions": [-1, -2]},
    "token-all-layers": {"all_layers": True, "start_layer": 1},
    "token-middle": {"start_layer": 1, "end_layer": 2, "mlp_split": "taylor"},
    "module-attn": {"granularity": "module", "module": "attn", "start_layer": 0},
    "module-mlp": {"granularity": "module", "module": "mlp", "start_layer": 1},
    "head": {"granularity": "head", "start_layer": 1, "targets": ["Paris", 7]},
    "head-layers": {"granularity": "head", "start_layer": [0, 1]},
    "neuron": {"granularity": "neuron", "start_layer": 0, "neurons": [1, 5, 40]},
    "neuron-all": {"granularity": "neuron", "start_layer": 1, "positions": [-1]},
    "subspace": {"granularity": "subspace", "start_layer": 1},
}


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[Client]:
    with Client(server, max_retries=0) as sdk:
        yield sdk


def subspace_for(engine: DePassEngine) -> np.ndarray:
    """Two components of the residual entering layer 1: the first half of the hidden units."""
    resid = engine.trace(engine.tokenize(PROMPT)).resid(1).float().numpy()  # (N, D)
    first = np.zeros_like(resid)
    first[:, : resid.shape[1] // 2] = resid[:, : resid.shape[1] // 2]
    return np.stack([first, np.random.default_rng(0).normal(size=resid.shape)]).astype(np.float32)


def fields_for(name: str, engine: DePassEngine) -> dict[str, Any]:
    fields = {"prompt": PROMPT, "outputs": ["scores", "states"], **REQUESTS[name]}
    if name == "subspace":
        fields["subspace"] = subspace_for(engine)
    return fields


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_every_granularity_round_trips_exactly_in_float32(
    client: Client, direct_engine: DePassEngine, name: str
) -> None:
    fields = fields_for(name, direct_engine)
    got = client.attribute(**fields)
    want = direct_engine.attribute(AttributionRequest(**fields))
    for key in ("tokens", "input_ids", "components", "positions", "targets", "target_tokens"):
        assert getattr(got, key) == getattr(want, key), key
    assert got.layers == want.layers
    assert got.conservation_error == want.conservation_error
    for key in ARRAYS:
        array = getattr(got, key)
        assert array.dtype == np.float32, key
        np.testing.assert_array_equal(array, getattr(want, key).numpy(), err_msg=key)
    assert set(got.timings) >= {"queue_s", "forward_s", "decompose_s", "total_s"}


REVERSE: dict[str, dict[str, Any]] = {
    "token": {"positions": [-1, 2], "targets": ["Paris", 7]},
    "heads-every-layer": {"granularity": "head", "start_layer": [0, 1], "positions": [-1]},
    "neurons-every-layer": {
        "granularity": "neuron",
        "start_layer": [0, 1],
        "positions": [-1],
        "top_k": 4,
    },
}


@pytest.mark.parametrize("name", sorted(REVERSE))
def test_reverse_strategy_over_http(client: Client, direct_engine: DePassEngine, name: str) -> None:
    """``strategy="reverse"`` (and ``top_k``) through the SDK: the engine's answer, exactly."""
    fields = {"prompt": PROMPT, "mlp_split": "taylor", "strategy": "reverse", **REVERSE[name]}
    got = client.attribute(**fields)
    want = direct_engine.attribute(AttributionRequest(**fields))
    assert got.strategy == want.strategy == "reverse"
    assert got.kept_top_k == want.kept_top_k == fields.get("top_k")
    assert got.components == want.components and got.layer_components == want.layer_components
    for key in ("scores", "remainder_scores", "logits"):
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key).numpy(), err_msg=key)
    if "top_k" in fields:  # each layer's 4 largest |score| at the one position and target
        assert got.scores is not None and got.scores.shape[2] <= 2 * fields["top_k"]


def test_reverse_with_another_split_is_a_422_naming_strategy(client: Client) -> None:
    with pytest.raises(UnprocessableEntityError) as caught:
        client.attribute(prompt=PROMPT, strategy="reverse", mlp_split="softmax")
    assert caught.value.param == "strategy" and "taylor" in str(caught.value)


@pytest.mark.parametrize("encoding", ["zstd+base64", "base64", "list"])
def test_float16_and_every_encoding(
    client: Client, direct_engine: DePassEngine, encoding: str
) -> None:
    fields = {"prompt": PROMPT, "outputs": ["scores", "states"]}
    got = client.attribute(array_dtype="float16", array_encoding=encoding, **fields)
    want = direct_engine.attribute(AttributionRequest(**fields))
    for key in ARRAYS:
        array = getattr(got, key)
        assert array.dtype == np.float16, key
        np.testing.assert_array_equal(array, getattr(want, key).numpy().astype(np.float16))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_safetensors_body_holds_the_same_arrays(
    client: Client, direct_engine: DePassEngine, dtype: str
) -> None:
    fields = {"prompt": PROMPT, "granularity": "head", "start_layer": 1}
    got = client.attribute(binary=True, outputs=["scores", "states"], array_dtype=dtype, **fields)
    want = direct_engine.attribute(AttributionRequest(outputs=["scores", "states"], **fields))
    assert got.components == want.components and got.model.startswith("tiny-llama")
    for key in ARRAYS:
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key).numpy().astype(dtype))


def test_states_of_a_20_token_prompt_travel_4x_smaller_than_json_lists(server: str) -> None:
    """The compressed encoding against float32 JSON lists, for the states of 20 tokens."""
    prompt = (
        "the capital of France is Paris and the capital of Italy is Rome and the capital of "
        "Spain is"
    )
    assert len(prompt.split()) == 19  # and the BOS: 20 tokens
    body = {"prompt": prompt, "outputs": ["states"]}
    sizes = {}
    for encoding in ("list", "zstd+base64", "base64"):
        response = httpx.post(
            f"{server}/v1/attributions", json=body | {"array_encoding": encoding}, timeout=60
        )
        assert response.status_code == 200, response.text
        assert response.json()["states"]["shape"] == [20, 20, 32]
        sizes[encoding] = len(response.content)
    binary = httpx.post(
        f"{server}/v1/attributions",
        json=body,
        headers={"Accept": "application/vnd.safetensors"},
        timeout=60,
    )
    sizes["safetensors"] = len(binary.content)
    ratio = sizes["list"] / sizes["zstd+base64"]
    print(f"states of 20 tokens, bytes on the wire: {sizes}; list / zstd+base64 = {ratio:.1f}x")
    assert ratio >= 4, sizes
    assert sizes["safetensors"] < sizes["base64"] < sizes["list"], sizes


def test_generate_attributes_every_generated_token(
    client: Client, direct_engine: DePassEngine
) -> None:
    got = client.generate(PROMPT, max_new_tokens=4, stop_at_eos=False)
    assert isinstance(got, Generation)
    assert got.finish_reason == "length" and got.seed is None
    assert len(got.generated_ids) == 4 and got.prompt_ids == direct_engine.tokenize(PROMPT)
    # greedy: each generated token is the model's top-1 after the ones before it
    sequence = got.prompt_ids + got.generated_ids
    n = len(got.prompt_ids)
    for i, token in enumerate(got.generated_ids):
        logits = direct_engine.trace(sequence[: n + i]).last_logits
        assert int(logits.argmax()) == token
    # one attribution of the whole sequence, each position scored on its own target
    want = direct_engine.attribute(
        AttributionRequest(
            input_ids=sequence[:-1],
            positions=list(range(n - 1, n + 3)),
            targets=got.generated_ids,
        )
    )
    g = np.arange(4)
    np.testing.assert_array_equal(got.scores, want.scores.numpy()[g, :, g])
    np.testing.assert_array_equal(got.logits, want.logits.numpy()[g, g])
    assert got.scores.shape == (4, n + 3) and got.components == want.components
    # scores plus the remainder add up to each generated token's logit
    np.testing.assert_allclose(got.scores.sum(1) + got.remainder_scores, got.logits, atol=1e-5)
    assert got.positions == list(range(n - 1, n + 3))


def test_sampling_is_reproducible_with_a_seed(client: Client) -> None:
    first = client.generate(PROMPT, max_new_tokens=5, temperature=1.5, top_p=0.9, seed=11)
    again = client.generate(PROMPT, max_new_tokens=5, temperature=1.5, top_p=0.9, seed=11)
    assert first.seed == 11 and first.generated_ids == again.generated_ids
    drawn = client.generate(PROMPT, max_new_tokens=2, temperature=1.0)
    assert drawn.seed is not None  # reported, so that the sample can be replayed
    replay = client.generate(PROMPT, max_new_tokens=2, temperature=1.0, seed=drawn.seed)
    assert replay.generated_ids == drawn.generated_ids


def test_tokenize_model_health(client: Client, direct_engine: DePassEngine) -> None:
    tokens = client.tokenize(PROMPT)
    assert tokens.input_ids == direct_engine.tokenize(PROMPT)
    assert tokens.tokens == ["<s>", "the", "capital", "of", "France", "is"]
    assert tokens.num_tokens == 6
    card = client.model()
    assert (card.family, card.num_layers, card.num_heads, card.num_kv_heads) == ("llama", 2, 4, 2)
    assert (card.hidden_size, card.intermediate_size, card.vocab_size) == (32, 48, 96)
    assert card.dtype == "float32" and card.device == "cpu"
    # the tiny model is built for 256 positions: that is the limit unless the operator raises it
    assert card.limits["max_input_tokens"] == 256 and card.limits["max_queue"] == 16
    assert client.health() == {"status": "ok"}
    assert client.ready()


def test_errors_arrive_as_sdk_exceptions(client: Client) -> None:
    with pytest.raises(UnprocessableEntityError) as caught:
        client.attribute(PROMPT, granularity="head", start_layer=9)
    assert caught.value.param == "start_layer" and caught.value.status_code == 422
    with pytest.raises(PayloadTooLargeError) as too_long:
        client.attribute(input_ids=[1] * 3000)
    assert too_long.value.code == "input_too_long"


def test_metrics_over_http(server: str, client: Client) -> None:
    client.attribute(PROMPT, granularity="neuron", start_layer=0, neurons=[1], positions=[-1])
    text = httpx.get(f"{server}/metrics").text
    assert 'granularity="neuron",method="POST",route="/v1/attributions",status="200"' in text


def test_results_keep_in_safetensors_files(client: Client, tmp_path: Any) -> None:
    result = client.attribute(PROMPT, outputs=["scores", "states"])
    path = tmp_path / "result.safetensors"
    result.to_safetensors(path)
    loaded = Attribution.from_safetensors(path)
    assert loaded.components == result.components and loaded.tokens == result.tokens
    for key in ARRAYS:
        np.testing.assert_array_equal(getattr(loaded, key), getattr(result, key))
    from safetensors.numpy import load_file

    assert set(load_file(str(path))) == set(ARRAYS)  # the reference library reads it too


def test_attribute_many_keeps_order(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    requests = [{"prompt": PROMPT, "granularity": "head", "start_layer": layer} for layer in (0, 1)]
    requests.append({"prompt": PROMPT, "start_layer": 7})
    results = client.attribute_many(requests, concurrency=2, return_exceptions=True)
    assert [r.components[1] for r in results[:2]] == ["L0.H0", "L1.H0"]
    assert isinstance(results[2], UnprocessableEntityError)
    assert "3/3" in capsys.readouterr().err


@pytest.mark.anyio
async def test_async_client_over_http(server: str, direct_engine: DePassEngine) -> None:
    async with AsyncClient(server) as sdk:
        got = await sdk.attribute(PROMPT, granularity="module", module="mlp", start_layer=0)
        many = await sdk.attribute_many(
            [{"prompt": PROMPT, "positions": [p]} for p in (-1, -2, -3)], progress=False
        )
        generation = await sdk.generate(PROMPT, max_new_tokens=2)
        assert (await sdk.model()).family == "llama"
        assert (await sdk.tokenize(PROMPT)).num_tokens == 6
        assert await sdk.health() == {"status": "ok"}
    want = direct_engine.attribute(
        AttributionRequest(prompt=PROMPT, granularity="module", module="mlp", start_layer=0)
    )
    np.testing.assert_array_equal(got.scores, want.scores.numpy())
    assert [r.positions for r in many] == [[5], [4], [3]]
    assert len(generation.generated_ids) == 2


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------------------- golden


def test_golden_parity_through_http(golden_server: str) -> None:
    """The golden tiny Llama's reference states and scores, through the service."""
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    entries = {e["file"]: e for e in manifest["files"]}
    with Client(golden_server) as sdk:
        for prompt_index in (0, 1):
            entry = entries[f"tiny-llama__p{prompt_index}__last_layer_softmax.npz"]
            want = np.load(GOLDEN / entry["file"])["attribute_state"]
            got = sdk.attribute(entry["prompt"], outputs=["states"], mlp_split="softmax")
            assert got.input_ids == entry["input_ids"] and got.tokens == entry["tokens"]
            assert got.states.shape == want.shape
            assert np.abs(got.states - want).max() <= 3e-5

            scored = entries[f"tiny-llama__p{prompt_index}__attribute_score.npz"]
            args = scored["args"]
            want_scores = np.load(GOLDEN / scored["file"])["attribute_score"]
            result = sdk.attribute(
                input_ids=scored["input_ids"],
                targets=[args["decode_token_id"]],
                positions=[args["token_idx"]],
            )
            assert np.abs(result.scores[0, :, 0] - want_scores).max() <= 3e-5

            entry = entries[f"tiny-llama__p{prompt_index}__layer_module_attn_head_s1.npz"]
            want = np.load(GOLDEN / entry["file"])["attribute_state"]
            heads = sdk.attribute(
                input_ids=entry["input_ids"],
                granularity="head",
                start_layer=entry["args"]["start_layer_idx"],
                outputs=["states"],
            )
            assert np.abs(heads.states - want).max() <= 3e-5
