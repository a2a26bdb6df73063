"""The embedded default model (``models/depass-tiny``): size, held-out accuracy per task and
DePass faithfulness on it, at the thresholds measured when it was trained (docs/default-model.md).

Prompts come from ``scripts/default_model_tasks.py``, the module the training script uses,
so the held-out cases here are exactly the ones the model never saw.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import default_model_tasks as tasks  # noqa: E402

from engine import AttributionRequest, DePassEngine  # noqa: E402

MODEL_DIR = tasks.MODEL_DIR

#: The issue asks for 95% top-1 on held-out cases; the committed model scores 100% on both.
MIN_ACCURACY = 0.95
#: Measured on the committed model (docs/default-model.md): 100% (200/200), both for the
#: logit and for the margin over the other name; the issue's floor is 90%.
MIN_IOI_TOP1_IS_A = 0.95
#: Measured over the 362 held-out fact prompts: the subject outscores every other input token
#: in 90.6% (logit) and 92.5% (margin over the best other attribute of the relation), and
#: holds over half of the positive credit in 90.6% and 91.7%. Every miss is a continent or
#: religion prompt (3-4 possible answers) where the relation word outscores the subject;
#: docs/default-model.md shows why, split rule by split rule.
MIN_FACTS_SUBJECT_LARGEST = 0.85
MIN_FACTS_SUBJECT_OVER_HALF = 0.85
#: The same on the six relations with five or more possible answers: 100% (273/273).
MIN_FACTS_SUBJECT_LARGEST_MANY_ANSWERS = 0.97

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").exists(),
    reason=f"default model not found at {MODEL_DIR}; build it with `make model`",
)


@pytest.fixture(scope="module")
def engine() -> DePassEngine:
    return DePassEngine.from_pretrained(str(MODEL_DIR))


@pytest.fixture(scope="module")
def facts() -> list[tasks.Fact]:
    return tasks.load_facts()


def test_size(engine: DePassEngine) -> None:
    weights = MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size < 20 * 1024**2
    params = sum(p.numel() for p in engine.model.parameters())
    assert 500_000 < params < 5_000_000
    assert engine.info.architecture == "LlamaForCausalLM"
    assert engine.info.vocab_size == len(engine.tokenizer)


def test_tokenizer_is_word_level(engine: DePassEngine, facts: list[tasks.Fact]) -> None:
    """Every prompt of both tasks is BOS + one known token per word, split as
    ``tasks.words`` splits it (the subject positions of the fact measures rely on it)."""
    train, held = tasks.fact_split(facts)
    tokenizer = engine.tokenizer
    for case in [*tasks.held_out_ioi(200), *train, *held]:
        ids = tokenizer(case.prompt)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.convert_ids_to_tokens(ids[1:]) == tasks.words(case.prompt), case.prompt
        assert tokenizer.unk_token_id not in ids, case.prompt
    vocab = tokenizer.get_vocab()
    assert all(word in vocab for word in (*tasks.NAMES, *tasks.PLACES, *tasks.OBJECTS))
    assert all(f.attribute in vocab for f in facts)


def test_held_out_name_pairs_are_unseen() -> None:
    train, held = tasks.ioi_pair_split()
    assert not set(train) & set(held)
    assert len(held) >= 200
    for case in tasks.held_out_ioi(200):
        assert tuple(sorted((case.answer, case.repeated))) in set(held)
    # the answer is the non-repeated name, in either order of mention
    cases = tasks.held_out_ioi(200)
    assert {c.answer_first for c in cases} == {True, False}
    assert {c.template for c in cases} == set(range(len(tasks.IOI_TEMPLATES)))


def test_held_out_accuracy_name_mover(engine: DePassEngine) -> None:
    cases = tasks.held_out_ioi(200)
    assert tasks.accuracy(engine.model, engine.tokenizer, cases) >= MIN_ACCURACY


def test_held_out_accuracy_facts(engine: DePassEngine, facts: list[tasks.Fact]) -> None:
    train, held = tasks.fact_split(facts)
    assert len(held) == len(facts) >= 300
    assert {(c.fact, c.template) for c in train}.isdisjoint({(c.fact, c.template) for c in held})
    assert tasks.accuracy(engine.model, engine.tokenizer, held) >= MIN_ACCURACY


def test_depass_credits_the_indirect_object(engine: DePassEngine) -> None:
    cases = tasks.held_out_ioi(200)
    credits = [tasks.ioi_credit(engine, c) for c in cases]
    for margin in (False, True):
        hits = [
            tasks.top_token(cr, margin) == c.answer for cr, c in zip(credits, cases, strict=True)
        ]
        assert sum(hits) / len(hits) >= MIN_IOI_TOP1_IS_A, f"margin={margin}"


def test_depass_credits_the_subject(engine: DePassEngine, facts: list[tasks.Fact]) -> None:
    _, held = tasks.fact_split(facts)
    credits = [tasks.fact_credit(engine, c, facts) for c in held]
    for margin in (False, True):
        shares = [tasks.subject_share(cr, c, margin) for cr, c in zip(credits, held, strict=True)]
        largest = sum(big for _, big in shares) / len(shares)
        over_half = sum(share > 0.5 for share, _ in shares) / len(shares)
        assert largest >= MIN_FACTS_SUBJECT_LARGEST, f"margin={margin}: {largest:.3f}"
        assert over_half >= MIN_FACTS_SUBJECT_OVER_HALF, f"margin={margin}: {over_half:.3f}"
    # relations with five answers or more: the relation word cannot decide among them
    answers = {r: {f.attribute for f in facts if f.relation_id == r} for r in tasks.RELATIONS}
    many = [
        (cr, c)
        for cr, c in zip(credits, held, strict=True)
        if len(answers[c.fact.relation_id]) >= 5
    ]
    assert len(many) >= 250
    largest = sum(tasks.subject_share(cr, c)[1] for cr, c in many) / len(many)
    assert largest >= MIN_FACTS_SUBJECT_LARGEST_MANY_ANSWERS, f"{largest:.3f}"


def test_worked_example(engine: DePassEngine) -> None:
    """The canonical prompt of docs/default-model.md, through the public request."""
    prompt = "When Mary and John went to the store, John gave a drink to"
    result = engine.attribute(
        AttributionRequest(
            prompt=prompt, granularity="token", targets=["Mary"], positions=[-1], outputs=["scores"]
        )
    )
    assert result.target_tokens == ["Mary"]
    assert int(engine.trace(result.input_ids).last_logits.argmax()) == result.targets[0]
    scores = result.scores[0, 1:, 0]  # BOS aside
    assert result.tokens[1 + int(torch.argmax(scores))] == "Mary"
    assert result.relative_conservation_error < 1e-4
