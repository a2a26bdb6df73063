"""What the viewer stands on: ``/ui`` served from the package, and ``POST /v1/next_tokens``
(the target picker's top-5), in-process against a tiny engine."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from engine import DePassEngine
from service import create_app
from service.ui import UI_DIR
from tests.service.conftest import PROMPT, running, settings
from tests.service.support import assert_envelope

pytestmark = pytest.mark.anyio

VIEWER_FILES = ["index.html", "viewer.css", "main.js", "api.js", "colours.js", "svg.js", "views.js"]


async def test_next_tokens_are_the_models_top_k(llama_engine: DePassEngine) -> None:
    async with running(llama_engine) as (_, client):
        answer = (
            await client.post(
                "/v1/next_tokens", json={"prompt": PROMPT, "positions": [-1, 2], "top_k": 4}
            )
        ).json()
        default = (
            await client.post("/v1/attributions", json={"prompt": PROMPT, "positions": [-1]})
        ).json()
    ids = llama_engine.tokenize(PROMPT)
    with torch.inference_mode():
        logits = llama_engine.model(input_ids=torch.tensor([ids])).logits[0].float()  # (N, V)
    assert answer["object"] == "next_tokens" and answer["input_ids"] == ids
    assert answer["positions"] == [len(ids) - 1, 2]
    for position, row in zip(answer["positions"], answer["predictions"], strict=True):
        top = logits[position].topk(4)
        probs = torch.softmax(logits[position], -1)[top.indices]
        assert [c["id"] for c in row] == top.indices.tolist()
        assert [c["logit"] for c in row] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert [c["probability"] for c in row] == pytest.approx(probs.tolist(), abs=1e-6)
        assert [c["token"] for c in row] == llama_engine.token_texts(top.indices.tolist())
    # the attribution's default target is the model's top-1 at the last position
    assert default["targets"] == [answer["predictions"][0][0]["id"]]


INVALID: list[tuple[dict[str, Any], str]] = [
    ({}, "prompt"),
    ({"prompt": PROMPT, "input_ids": [1]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [1, 500]}, "input_ids"),
    ({"prompt": PROMPT, "positions": [6]}, "positions"),
    ({"prompt": PROMPT, "positions": [-7]}, "positions"),
    ({"prompt": PROMPT, "positions": []}, "positions"),
    ({"prompt": PROMPT, "top_k": 0}, "top_k"),
    ({"prompt": PROMPT, "top_k": 101}, "top_k"),
    ({"prompt": PROMPT, "top_k": "5"}, "top_k"),
    ({"prompt": PROMPT, "k": 5}, "k"),
]


@pytest.mark.parametrize(("body", "param"), INVALID)
async def test_invalid_next_tokens_get_422_naming_the_field(
    llama_engine: DePassEngine, body: dict[str, Any], param: str
) -> None:
    async with running(llama_engine) as (_, client):
        response = await client.post("/v1/next_tokens", json=body)
    assert_envelope(response, 422, param)


async def test_next_tokens_input_over_the_limit_gets_413(llama_engine: DePassEngine) -> None:
    async with running(llama_engine, max_input_tokens=3) as (_, client):
        response = await client.post("/v1/next_tokens", json={"prompt": PROMPT})
    assert assert_envelope(response, 413, "prompt")["code"] == "input_too_long"


def test_the_viewer_is_served_from_the_package(llama_engine: DePassEngine) -> None:
    with TestClient(create_app(settings(api_key="k"), engine=llama_engine)) as client:
        redirect = client.get("/ui", follow_redirects=False)
        assert redirect.status_code == 307 and redirect.headers["location"] == "ui/"
        page = client.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.text == (UI_DIR / "index.html").read_text()
        for name in VIEWER_FILES:
            served = client.get(f"/ui/{name}")
            assert served.status_code == 200, name
            text = served.text
            # nothing from another origin: the page works on a machine without internet
            assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), name
            assert "https://" not in text, name
        assert "javascript" in client.get("/ui/main.js").headers["content-type"]
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self';" in policy
        # the page is open; its data is behind the key
        assert client.get("/v1/model").status_code == 401
        card = client.get("/v1/model", headers={"Authorization": "Bearer k"}).json()
        assert card["auth_required"] is True
        assert client.get("/ui/nothing.js").status_code == 404


def test_the_viewer_can_be_turned_off(llama_engine: DePassEngine) -> None:
    with TestClient(create_app(settings(ui_enabled=False), engine=llama_engine)) as client:
        assert client.get("/ui/").status_code == 404
        assert client.get("/ui", follow_redirects=False).status_code == 404
        assert client.get("/ready").status_code == 200


async def test_openapi_documents_next_tokens(llama_engine: DePassEngine) -> None:
    async with running(llama_engine) as (_, client):
        spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/v1/next_tokens"]["post"]
    for status in ("401", "413", "422", "429", "503", "504"):
        schema = operation["responses"][status]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorResponse"), status
    assert not any(path.startswith("/ui") for path in spec["paths"])  # files, not API
