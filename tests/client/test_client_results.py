"""SDK results: array decoding, the safetensors codec, helpers, and attribute_many."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import zstandard
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

import depass_client as dc
from depass_client import _arrays, _safetensors
from depass_client._progress import ProgressBar
from tests.client.conftest import (
    ATTRIBUTION,
    RecordingAsyncClient,
    RecordingClient,
    Script,
    envelope,
)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("encoding", ["list", "base64", "zstd+base64"])
def test_array_objects_decode_exactly(dtype: str, encoding: str) -> None:
    array = RNG.normal(size=(2, 3, 4)).astype(dtype)
    if encoding == "list":
        data: object = array.tolist()
    else:
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
        if encoding == "zstd+base64":
            raw = zstandard.ZstdCompressor().compress(raw)
        data = base64.b64encode(raw).decode()
    obj = {"dtype": dtype, "shape": [2, 3, 4], "encoding": encoding, "data": data}
    decoded = _arrays.decode(obj)
    assert decoded.dtype == np.dtype(dtype) and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, array)
    assert _arrays.decode(None) is None
    with pytest.raises(dc.DePassError):
        _arrays.decode({"dtype": "float32", "shape": [1], "encoding": "brotli", "data": ""})


def test_sdk_encoding_matches_the_service_decoder() -> None:
    from service.arrays import decode_array

    array = RNG.normal(size=(2, 5, 8))
    for encoding in ("list", "base64", "zstd+base64"):
        obj = _arrays.encode(array, encoding)
        back = decode_array(**obj, max_bytes=10**6)
        np.testing.assert_array_equal(back, array.astype(np.float32))


def test_safetensors_codec_interoperates_with_the_reference_library() -> None:
    tensors = {
        "b": RNG.normal(size=(3, 4)).astype(np.float16),
        "a": RNG.normal(size=(2, 1, 5)).astype(np.float32),
        "ids": np.arange(7, dtype=np.int64),
    }
    ours = _safetensors.dumps(tensors, {"depass": '{"x": 1}'})
    theirs = st_load(ours)
    for name, array in tensors.items():
        np.testing.assert_array_equal(theirs[name], array)
    back, metadata = _safetensors.loads(st_save(tensors, metadata={"k": "v"}))
    assert metadata == {"k": "v"}
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array)
    for broken in (b"", b"\xff" * 8 + b"{}", ours[:-3]):
        with pytest.raises(dc.DePassError):
            _safetensors.loads(broken)


def test_attribution_helpers(tmp_path: object) -> None:
    result = dc.Attribution.from_json(ATTRIBUTION)
    assert result.top_components(5) == [('tok[0]:"<s>"', 0.5), ('tok[1]:"a"', -0.25)]
    table = result.table()
    assert "target 'b' (id 7) at position 1 'a', logit 0.2500" in table
    assert "remainder" in table and "conservation error" in table
    lines = table.splitlines()
    assert lines[2].split()[:3] == ["1", 'tok[0]:"<s>"', "0.5000"]
    path = tmp_path / "r.safetensors"  # type: ignore[operator]
    result.to_safetensors(path)
    again = dc.Attribution.from_safetensors(path)
    assert again.components == result.components and again.timings == result.timings
    np.testing.assert_array_equal(again.scores, result.scores)
    assert again.states is None
    assert json.loads(json.dumps(result.to_dict()))["scores"] == [[[0.5], [-0.25]]]
    with pytest.raises(ValueError, match="scores"):
        dc.Attribution.from_json({**ATTRIBUTION, "scores": None}).top_components()


def test_progress_bar_draws_in_place_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = ProgressBar(4, stream=screen)
    for _ in range(4):
        bar.update()
    bar.close()
    assert screen.getvalue().count("\r") == 5 and "4/4 100%" in screen.getvalue()
    log = io.StringIO()
    bar = ProgressBar(2, stream=log)
    bar.update(2)
    bar.close()
    assert log.getvalue().count("\n") == 1 and "2/2" in log.getvalue()


def test_attribute_many_in_order_with_errors(capsys: pytest.CaptureFixture[str]) -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["prompt"] == "bad":
            return envelope(422, "prompt: bad", param="prompt")
        return httpx.Response(200, json={**ATTRIBUTION, "tokens": ["<s>", body["prompt"]]})

    client = RecordingClient(Script())
    client._http = httpx.Client(transport=httpx.MockTransport(reply))
    prompts = ["p0", "p1", "bad", "p3", "p4"]
    results = client.attribute_many(
        [{"prompt": p} for p in prompts], concurrency=3, return_exceptions=True
    )
    assert [r.tokens[1] for i, r in enumerate(results) if i != 2] == ["p0", "p1", "p3", "p4"]
    assert isinstance(results[2], dc.UnprocessableEntityError)
    assert "5/5" in capsys.readouterr().err
    with pytest.raises(dc.UnprocessableEntityError):
        client.attribute_many([{"prompt": "bad"}], progress=False)


@pytest.mark.anyio
async def test_async_attribute_many_in_order() -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        return httpx.Response(200, json={**ATTRIBUTION, "positions": body["positions"]})

    client = RecordingAsyncClient(Script())
    client._http = httpx.AsyncClient(transport=httpx.MockTransport(reply))
    results = await client.attribute_many(
        [{"prompt": "a", "positions": [i]} for i in range(6)], concurrency=2, progress=False
    )
    assert [r.positions for r in results] == [[i] for i in range(6)]


def _heads_over_layers() -> dict:
    """A head attribution over layers 1 and 2 as the service sends it: layer-free
    components, each layer's labels apart."""
    scores = [[[[0.1], [0.9], [-0.2]]], [[[0.3], [-0.5], [0.7]]]]  # (2, 1, 3, 1)
    return {
        **ATTRIBUTION,
        "granularity": "head",
        "components": ["rest", "H0", "H1"],
        "layer_components": [["rest", "L1.H0", "L1.H1"], ["rest", "L2.H0", "L2.H1"]],
        "first_positions": [0, 0, 0],
        "layers": [1, 2],
        "scores": {"dtype": "float32", "shape": [2, 1, 3, 1], "encoding": "list", "data": scores},
        "remainder_scores": {
            "dtype": "float32",
            "shape": [2, 1, 1],
            "encoding": "list",
            "data": [[[0.0]], [[0.0]]],
        },
        "logits": {
            "dtype": "float32",
            "shape": [2, 1, 1],
            "encoding": "list",
            "data": [[[0.8]], [[0.5]]],
        },
    }


def test_each_layer_is_named_by_its_own_labels() -> None:
    result = dc.Attribution.from_json(_heads_over_layers())
    assert result.top_components(1, layer=0) == [("L1.H0", pytest.approx(0.9))]
    assert result.top_components(1, layer=1) == [("L2.H1", pytest.approx(0.7))]
    assert result.labels(0)[1] == "L1.H0" and result.labels(-1)[2] == "L2.H1"
    table = result.table(k=2, layer=0)
    assert "layer 1" in table.splitlines()[0] and "L1.H0" in table and "L2." not in table
    plain = dc.Attribution.from_json(ATTRIBUTION)
    assert plain.labels() == plain.components  # one set of labels


def test_tables_rank_only_components_present_at_the_position() -> None:
    body = {
        **ATTRIBUTION,
        "tokens": ["<s>", "a", "b"],
        "input_ids": [1, 5, 6],
        "components": ['tok[0]:"<s>"', 'tok[1]:"a"', 'tok[2]:"b"'],
        "first_positions": [0, 1, 2],
        "positions": [1, 2],
        "targets": [8],
        "target_tokens": ["d"],
        "position_targets": [[7], [8]],
        "position_target_tokens": [["c"], ["d"]],
        "scores": {
            "dtype": "float32",
            "shape": [2, 3, 1],
            "encoding": "list",
            "data": [[[-0.5], [-0.25], [0.0]], [[0.5], [0.25], [0.125]]],
        },
        "remainder_scores": {
            "dtype": "float32",
            "shape": [2, 1],
            "encoding": "list",
            "data": [[0], [0]],
        },
        "logits": {
            "dtype": "float32",
            "shape": [2, 1],
            "encoding": "list",
            "data": [[-0.75], [0.875]],
        },
    }
    result = dc.Attribution.from_json(body)
    # at position 1 the later token (exactly 0) is absent, not ranked above the negatives
    assert result.top_components(3, position=0) == [('tok[1]:"a"', -0.25), ('tok[0]:"<s>"', -0.5)]
    assert len(result.top_components(3, position=1)) == 3
    assert result.target(0) == (7, "c") and result.target(1) == (8, "d")
    assert result.table(position=0).startswith("target 'c' (id 7) at position 1 'a'")


def test_keep_top_keeps_what_the_engine_keeps() -> None:
    """``keep_top`` selects as the engine's ``AttributionResult.keep_top`` (the union of
    each position's and layer's top-k by |score|, in the original order)."""
    import torch

    from engine.result import AttributionResult

    result = dc.Attribution.from_json(_heads_over_layers())
    kept = result.keep_top(1)
    assert kept.kept_top_k == 1 and kept.components == ["H0", "H1"]
    assert kept.layer_components == [["L1.H0", "L1.H1"], ["L2.H0", "L2.H1"]]
    np.testing.assert_array_equal(kept.scores, result.scores[:, :, 1:])
    assert result.keep_top(5).components == result.components
    fields = {f: getattr(result, f) for f in result.__dataclass_fields__}
    arrays = {
        k: None if v is None else torch.from_numpy(v)
        for k, v in fields.items()
        if k in dc.Attribution.ARRAYS
    }
    engine = AttributionResult(
        **{k: v for k, v in fields.items() if k not in dc.Attribution.ARRAYS and k != "model"},
        **{k: v for k, v in arrays.items() if k != "capped_logits"},
    )
    for k in (1, 2, 3):
        assert engine.keep_top(k).components == result.keep_top(k).components
    # one vocabulary: the score row, component presence, the target and the ranking
    for layer in (0, 1):
        np.testing.assert_allclose(
            engine.score_row(layer=layer).numpy(), result.score_row(layer=layer)
        )
        got, want = engine.top_components(2, layer=layer), result.top_components(2, layer=layer)
        assert [name for name, _ in got] == [name for name, _ in want]
        assert [score for _, score in got] == pytest.approx([score for _, score in want])
    assert engine.present() == result.present().tolist()
    assert engine.target() == result.target()
