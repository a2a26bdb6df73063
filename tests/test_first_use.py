"""What a new user meets first in the engine (issue 22): the first-token rule's default
follows the tokenizer, group labels read as text, and partial UTF-8 tokens show bytes."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine import AttributionRequest, DePassEngine
from engine.testing import tiny_model, word_tokenizer
from engine.tokens import Tokens

PROMPT = "when Mary and John went to the store John gave a drink to"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def with_bos(model: torch.nn.Module) -> DePassEngine:
    return DePassEngine(model, word_tokenizer(bos=True))


@pytest.fixture(scope="module")
def without_bos(model: torch.nn.Module) -> DePassEngine:
    return DePassEngine(model, word_tokenizer(bos=False))


def test_the_first_token_rule_is_on_by_default_only_after_a_bos(
    with_bos: DePassEngine, without_bos: DePassEngine
) -> None:
    """The rule is for an attention-sink BOS; on a BOS-less tokenizer it would fall on the
    first word, so its default is off there (and the result says which was applied)."""
    for engine, applied in ((with_bos, True), (without_bos, False)):
        default = engine.attribute(AttributionRequest(prompt=PROMPT, positions=[-1]))
        asked = engine.attribute(
            AttributionRequest(prompt=PROMPT, positions=[-1], ignore_bos=applied)
        )
        assert default.ignore_bos is applied
        torch.testing.assert_close(default.scores, asked.scores, rtol=0, atol=0)
    # the BOS-less default differs from the rule on: the rule does something here
    on = without_bos.attribute(AttributionRequest(prompt=PROMPT, positions=[-1], ignore_bos=True))
    off = without_bos.attribute(AttributionRequest(prompt=PROMPT, positions=[-1]))
    assert on.ignore_bos and not off.ignore_bos
    assert not torch.equal(on.scores, off.scores)


def test_the_default_follows_the_first_id_and_the_granularity(with_bos: DePassEngine) -> None:
    ids = with_bos.tokenize(PROMPT)
    assert ids[0] == with_bos.tokenizer.bos_token_id
    assert with_bos.attribute(AttributionRequest(input_ids=ids)).ignore_bos is True
    assert with_bos.attribute(AttributionRequest(input_ids=ids[1:])).ignore_bos is False
    head = AttributionRequest(prompt=PROMPT, granularity="head", start_layer=0)
    assert with_bos.attribute(head).ignore_bos is False  # off for non-token runs, as before


def test_a_chat_templates_first_special_token_turns_the_rule_on(
    model: torch.nn.Module,
) -> None:
    tokenizer = word_tokenizer(bos=False)
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    engine = DePassEngine(model, tokenizer)
    chat = engine.attribute(AttributionRequest(messages=[{"role": "user", "content": PROMPT}]))
    assert chat.tokens[0] == "<s>" and chat.ignore_bos is True


def test_group_labels_are_the_decoded_text_of_their_tokens(with_bos: DePassEngine) -> None:
    result = with_bos.attribute(AttributionRequest(prompt=PROMPT, groups=[[1, 2, 3], [4, 6]]))
    assert result.components == ['tok[1:4]:"when Mary and"', 'tok[4,6]:"John…to"', "ungrouped"]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on a few words, so that CJK characters and
    emoji split into byte tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(["the cat sat on the mat"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_partial_utf8_tokens_show_their_bytes() -> None:
    tokenizer = byte_level_tokenizer()
    tokens = Tokens(tokenizer, len(tokenizer))
    ids = tokenizer("the 你 🎉")["input_ids"]
    texts = tokens.texts(ids)
    assert not any("\ufffd" in text for text in texts), texts
    assert "".join(texts) == "the <0xE4><0xBD><0xA0> <0xF0><0x9F><0x8E><0x89>"
    assert any(text.startswith("<0x") for text in texts)  # single byte tokens among them
    assert tokens.span_text(ids) == "the 你 🎉"  # whole characters decode as text


def test_byte_fallback_pieces_keep_their_spelling() -> None:
    """SentencePiece byte-fallback tokens are already spelled <0xE4>."""
    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens(["<0xE4>"])
    piece = tokenizer.convert_tokens_to_ids("<0xE4>")
    assert Tokens(tokenizer, len(tokenizer)).texts([piece]) == ["<0xE4>"]


def test_the_time_estimate_follows_the_work(with_bos: DePassEngine) -> None:
    """Token runs grow as N^2 (N^3 in the mixing), groups and later start layers cost
    less, and what the refusal says fits does fit."""
    from engine import TimeBudgetError, cost

    def plan(n: int, **fields: object):
        return with_bos.plan(AttributionRequest(input_ids=[5] * n, positions=[-1], **fields))

    work = {n: cost.plan_work(with_bos.shape, plan(n)) for n in (100, 200)}
    assert 3.5 < work[200].decompose / work[100].decompose < 4.5
    assert 7 < work[200].mixing / work[100].mixing < 9
    grouped = cost.plan_work(with_bos.shape, plan(200, groups=[list(range(0, 100))]))
    later = cost.plan_work(with_bos.shape, plan(200, start_layer=1))
    assert grouped.flops < work[200].flops / 10 and later.flops < work[200].flops
    budget = with_bos.estimate_seconds(plan(200)) / 3
    with pytest.raises(TimeBudgetError) as caught:
        with_bos.check_time(plan(200), budget, "input_ids")
    fits = int(caught.value.message.split("an input of at most ")[1].split()[0])
    assert 1 < fits < 200
    assert (
        with_bos.estimate_seconds(plan(fits)) <= budget < with_bos.estimate_seconds(plan(fits + 1))
    )
