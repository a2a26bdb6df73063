"""What names a result's axes: per-layer head labels, each position's own default target,
the components that exist at a position, and chat requests (``messages``)."""

from __future__ import annotations

import copy

import pytest
import torch

from engine import AttributionRequest, DePassEngine, RequestError
from engine.testing import tiny_model, word_tokenizer

PROMPT = "the capital of France is"
#: A minimal chat template in the style of ChatML, over the word tokenizer's words.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}the{% endif %}"
)


@pytest.fixture(scope="module")
def engine() -> DePassEngine:
    """A tiny three-layer Llama (so that a list of head layers has three entries)."""
    return DePassEngine(tiny_model("llama", seed=5, num_hidden_layers=3), word_tokenizer())


def test_head_labels_name_each_layer(engine: DePassEngine) -> None:
    result = engine.attribute(
        AttributionRequest(prompt=PROMPT, granularity="head", start_layer=[0, 1, 2], positions=[-1])
    )
    assert result.layers == [0, 1, 2] and result.scores.shape == (3, 1, 5, 1)
    assert result.components == ["rest", "H0", "H1", "H2", "H3"]
    assert result.layer_components == [
        ["rest", *(f"L{layer}.H{h}" for h in range(4))] for layer in (0, 1, 2)
    ]
    # each layer's slice equals the single-layer request, labels included
    for index, layer in enumerate(result.layers):
        alone = engine.attribute(
            AttributionRequest(prompt=PROMPT, granularity="head", start_layer=layer, positions=[-1])
        )
        assert alone.components == result.labels(index) and alone.layer_components is None
        torch.testing.assert_close(result.scores[index], alone.scores)
        assert result.top_components(2, layer=index) == alone.top_components(2)
        assert all(
            name.startswith(f"L{layer}.")
            for name, _ in result.top_components(5, layer=index)
            if name != "rest"
        )


def test_single_layer_and_all_layers_keep_plain_labels(engine: DePassEngine) -> None:
    single = engine.attribute(AttributionRequest(prompt=PROMPT, granularity="head", start_layer=1))
    assert single.components == ["rest", "L1.H0", "L1.H1", "L1.H2", "L1.H3"]
    stacked = engine.attribute(AttributionRequest(prompt=PROMPT, all_layers=True))
    assert stacked.layer_components is None and stacked.labels(0) == stacked.components


def test_default_target_is_each_positions_own_top_token(engine: DePassEngine) -> None:
    ids = engine.tokenize(PROMPT)
    result = engine.attribute(AttributionRequest(input_ids=ids, positions=[2, -1]))
    for index, position in enumerate(result.positions):
        trace = engine.trace(ids[: position + 1])  # the model's own next token there
        own = int(trace.last_logits.argmax())
        assert result.position_targets[index] == [own]
        assert result.position_target_tokens[index] == engine.token_texts([own])
        # the scores add up to that token's logit at that position
        total = result.scores[index, :, 0].sum() + result.remainder_scores[index, 0]
        assert abs(float(total) - float(trace.last_logits[own])) <= 1e-4
    assert result.targets == result.position_targets[-1]
    assert result.target_tokens == result.position_target_tokens[-1]
    # asked targets are the same at every position
    asked = engine.attribute(AttributionRequest(input_ids=ids, positions=[2, 4], targets=[7, 9]))
    assert asked.position_targets == [[7, 9], [7, 9]] and asked.targets == [7, 9]


def test_absent_components_are_not_ranked(engine: DePassEngine) -> None:
    result = engine.attribute(AttributionRequest(prompt=PROMPT, positions=[2]))
    assert result.first_positions == list(range(6))
    ranked = result.top_components(10)
    assert [name for name, _ in ranked if name.startswith("tok[")] and len(ranked) == 3
    assert {name for name, _ in ranked} == set(result.components[:3])
    # the later tokens are exactly 0 there, and would have been ranked above negatives
    assert torch.all(result.scores[0, 3:, 0] == 0)
    grouped = engine.attribute(
        AttributionRequest(prompt=PROMPT, groups=[[4, 5], [0]], positions=[1])
    )
    assert grouped.components == ['tok[4:6]:"France is"', 'tok[0]:"<s>"', "ungrouped"]
    assert grouped.first_positions == [4, 0, 1]
    assert [name for name, _ in grouped.top_components(5)] == sorted(
        ['tok[0]:"<s>"', "ungrouped"],
        key=lambda n: -float(grouped.scores[0, grouped.components.index(n), 0]),
    )


@pytest.fixture(scope="module")
def chat_engine(engine: DePassEngine) -> DePassEngine:
    """The same model with a tokenizer that has a chat template."""
    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.chat_template = TEMPLATE
    return DePassEngine(engine.model, tokenizer)


def test_messages_use_the_chat_template_with_the_generation_prompt(
    chat_engine: DePassEngine,
) -> None:
    messages = [{"role": "user", "content": "the capital of France"}]
    want = chat_engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    result = chat_engine.attribute(AttributionRequest(messages=messages, positions=[-1]))
    assert result.input_ids == list(want)
    assert result.tokens == ["<s>", "<unk>", "the", "capital", "of", "France", "the"]
    assert result.components[-1] == 'tok[6]:"the"'  # the template's tokens are components
    plain = chat_engine.attribute(AttributionRequest(input_ids=list(want), positions=[-1]))
    torch.testing.assert_close(result.scores, plain.scores)
    assert result.targets == plain.targets == [int(chat_engine.trace(want).last_logits.argmax())]


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([], "at least one"),
        ("hello", "list"),
        ([{"role": "robot", "content": "x"}], "role"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user"}], "'role' and 'content'"),
    ],
)
def test_bad_messages_are_named(messages: object, words: str) -> None:
    with pytest.raises(RequestError) as caught:
        AttributionRequest(messages=messages)  # type: ignore[arg-type]
    assert caught.value.field == "messages" and words in caught.value.message


def test_messages_exclude_the_other_inputs_and_need_a_template(engine: DePassEngine) -> None:
    chat = [{"role": "user", "content": "the"}]
    with pytest.raises(RequestError) as caught:
        AttributionRequest(prompt="the", messages=chat)
    assert caught.value.field == "prompt" and "'messages'" in caught.value.message
    with pytest.raises(RequestError) as caught:
        engine.attribute(AttributionRequest(messages=chat))
    assert caught.value.field == "messages" and "no chat template" in caught.value.message
