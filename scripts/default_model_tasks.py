"""The tasks of the embedded default model (``models/depass-tiny``), shared by the training
script and the tests, so that both draw the same prompts from the same lists.

Two tasks, each with a known decisive input token:

1. **Name mover** (indirect object identification): ``When {A} and {B} went to the
   {place}, {B} gave a {object} to`` -> ``{A}``, the name that is *not* repeated, in five
   templates and both name orders. Unordered name pairs are split once into a training set
   and a held-out set, so that a held-out prompt puts together two names the model never
   saw in one sentence.
2. **Facts**: subject -> attribute over the Known_1000 facts copied in
   ``data/known_facts.json``, each relation asked in three phrasings. Every fact is trained
   in two of them; the third, held out, is the evaluation (the model has seen that phrasing
   only with *other* subjects).

Nothing here needs torch or the engine; the evaluation helpers at the end import them
lazily.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FACTS_PATH = REPO / "data" / "known_facts.json"
MODEL_DIR = REPO / "models" / "depass-tiny"

#: Seed of every split and of the evaluation prompts (training has its own seed).
SPLIT_SEED = 2510_18462

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")

# ---------------------------------------------------------------------------- name mover

NAMES: tuple[str, ...] = tuple(
    (
        "Mary John Anna Peter Laura David Sarah Tom Emma James Alice Bob Carol Daniel Eve "
        "Frank Grace Henry Irene Jack Julia Kevin Lucy Mark Nina Oscar Paula Quinn Rachel "
        "Sam Tina Victor Wendy Adam Beth Chris Diana Eric Fiona George Helen Ian Kate Leo "
        "Maria Nick Olivia Paul Rose Steve"
    ).split()
)
PLACES: tuple[str, ...] = tuple(
    "store park school market station garden library hospital office restaurant".split()
)
OBJECTS: tuple[str, ...] = tuple("drink book ball gift letter ring key phone bag flower".split())

#: ``{N1}``/``{N2}``: the two names in order of mention; ``{B}``: the repeated one.
IOI_TEMPLATES: tuple[str, ...] = (
    "When {N1} and {N2} went to the {place} , {B} gave a {object} to",
    "Then , {N1} and {N2} had a long argument . Afterwards {B} said to",
    "After {N1} and {N2} arrived at the {place} , {B} handed the {object} to",
    "While {N1} and {N2} were working at the {place} , {B} brought a {object} to",
    "When {N1} and {N2} got a {object} at the {place} , {B} decided to give it to",
)

#: One unordered name pair in this many is held out of training entirely.
IOI_HELD_OUT_EVERY = 5


@dataclass(frozen=True)
class IOIPrompt:
    """A name-mover prompt; ``answer`` is the non-repeated name ``A``."""

    prompt: str
    answer: str  # A
    repeated: str  # B
    template: int
    answer_first: bool  # A is the first name mentioned


def _tidy(text: str) -> str:
    """Templates are written with spaced punctuation; print it the usual way. The word-level
    tokenizer splits punctuation off either way, so both spellings give the same tokens."""
    return re.sub(r" ([,.])", r"\1", text)


def ioi_prompt(
    a: str, b: str, template: int, answer_first: bool, place: str, obj: str
) -> IOIPrompt:
    """The prompt of one name-mover case."""
    first, second = (a, b) if answer_first else (b, a)
    text = IOI_TEMPLATES[template].format(N1=first, N2=second, B=b, place=place, object=obj)
    return IOIPrompt(_tidy(text), a, b, template, answer_first)


def ioi_pair_split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training pairs, held-out pairs): unordered name pairs, each sorted alphabetically.
    Every name is in both sets, so only the combination is new at evaluation."""
    pairs = sorted(tuple(sorted(p)) for p in itertools.combinations(NAMES, 2))
    random.Random(SPLIT_SEED).shuffle(pairs)
    held = sorted(pairs[::IOI_HELD_OUT_EVERY])
    train = sorted(set(pairs) - set(held))
    return train, held


def sample_ioi(rng: random.Random, pairs: Sequence[tuple[str, str]]) -> IOIPrompt:
    """A random name-mover case over ``pairs`` (either name may be the answer)."""
    a, b = rng.choice(pairs)
    if rng.random() < 0.5:
        a, b = b, a
    return ioi_prompt(
        a,
        b,
        rng.randrange(len(IOI_TEMPLATES)),
        rng.random() < 0.5,
        rng.choice(PLACES),
        rng.choice(OBJECTS),
    )


def held_out_ioi(count: int = 200, seed: int = SPLIT_SEED) -> list[IOIPrompt]:
    """``count`` name-mover prompts on held-out name pairs, the same on every call."""
    _, held = ioi_pair_split()
    rng = random.Random(seed)
    return [sample_ioi(rng, held) for _ in range(count)]


# ---------------------------------------------------------------------------- facts

#: relation id -> (what it asks, three phrasings; ``{}`` is the subject). Phrasings follow
#: Known_1000's own templates for the relation, reworded where those were not clean.
RELATIONS: dict[str, tuple[str, tuple[str, str, str]]] = {
    "P30": (
        "continent",
        (
            "{} belongs to the continent of",
            "{} is located in the continent of",
            "{} is a part of the continent of",
        ),
    ),
    "P17": (
        "country",
        (
            "{} is located in the country of",
            "{} can be found in the country of",
            "{} lies in the country of",
        ),
    ),
    "P27": (
        "citizenship",
        (
            "{} is a citizen of",
            "{} has a citizenship of",
            "{} holds the citizenship of",
        ),
    ),
    "P103": (
        "native language",
        (
            "The native language of {} is",
            "{} is a native speaker of",
            "The mother tongue of {} is",
        ),
    ),
    "P37": (
        "official language",
        (
            "The official language of {} is",
            "The language spoken in {} is",
            "The people of {} speak",
        ),
    ),
    "P36": (
        "capital",
        (
            "The capital of {} is",
            "The capital city of {} is",
            "The seat of government of {} is",
        ),
    ),
    "P641": (
        "sport",
        (
            "{} professionally plays the sport of",
            "{} is a professional player of",
            "The sport played by {} is",
        ),
    ),
    "P140": (
        "religion",
        (
            "{} follows the religion of",
            "{} is affiliated with the religion of",
            "The religion of {} is",
        ),
    ),
}

_WORD = re.compile(r"\w+|[^\w\s]+")


def words(text: str) -> list[str]:
    """The word-level tokens of ``text``, as the ``Whitespace`` pre-tokenizer splits it."""
    return _WORD.findall(text)


@dataclass(frozen=True)
class Fact:
    """One Known_1000 fact."""

    known_id: int
    subject: str
    attribute: str
    relation_id: str


@dataclass(frozen=True)
class FactPrompt:
    """A fact asked in one phrasing; ``subject_words`` is the [start, stop) range of the
    subject among the prompt's word tokens (BOS not counted)."""

    prompt: str
    answer: str
    fact: Fact
    template: int
    subject_words: tuple[int, int]


def load_facts(path: Path = FACTS_PATH) -> list[Fact]:
    """The facts of ``data/known_facts.json``, in file order."""
    records = json.loads(Path(path).read_text())
    return [
        Fact(int(r["known_id"]), r["subject"], r["attribute"], r["relation_id"]) for r in records
    ]


def fact_prompt(fact: Fact, template: int) -> FactPrompt:
    """``fact`` asked in phrasing ``template`` of its relation."""
    text = RELATIONS[fact.relation_id][1][template]
    before, after = text.split("{}")
    start = len(words(before))
    stop = start + len(words(fact.subject))
    prompt = text.format(fact.subject)
    if words(prompt) != words(before) + words(fact.subject) + words(after):
        raise ValueError(f"subject {fact.subject!r} merges with its template {text!r}")
    return FactPrompt(prompt, fact.attribute, fact, template, (start, stop))


def held_out_template(fact: Fact, index_in_relation: int) -> int:
    """Which phrasing of ``fact`` is held out: they rotate within each relation, so every
    phrasing is trained with two thirds of the subjects and evaluated on the rest."""
    return index_in_relation % 3


def fact_split(facts: Sequence[Fact]) -> tuple[list[FactPrompt], list[FactPrompt]]:
    """(training prompts: two phrasings per fact, held-out prompts: the third)."""
    seen: dict[str, int] = {}
    train: list[FactPrompt] = []
    held: list[FactPrompt] = []
    for fact in facts:
        index = seen.get(fact.relation_id, 0)
        seen[fact.relation_id] = index + 1
        out = held_out_template(fact, index)
        for template in range(3):
            (held if template == out else train).append(fact_prompt(fact, template))
    return train, held


def select_known_facts(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Known_1000 records the model learns: relations in :data:`RELATIONS`, one-word
    attributes, subjects that stay whole words next to every phrasing and are not asked
    twice in one relation. Records are kept verbatim, in file order."""
    kept: list[dict[str, Any]] = []
    asked: set[tuple[str, str]] = set()
    for record in records:
        relation = record["relation_id"]
        if relation not in RELATIONS or not re.fullmatch(r"\w+", record["attribute"]):
            continue
        key = (relation, record["subject"])
        if key in asked:
            continue
        fact = Fact(int(record["known_id"]), record["subject"], record["attribute"], relation)
        try:
            for template in range(3):
                fact_prompt(fact, template)
        except ValueError:
            continue
        asked.add(key)
        kept.append(dict(record))
    return kept


# ---------------------------------------------------------------------------- corpus


def vocabulary(facts: Sequence[Fact]) -> list[str]:
    """Every token of both tasks: special tokens, names, then the other words sorted."""
    name = NAMES[0]
    texts = [t.format(N1=name, N2=name, B=name, place="", object="") for t in IOI_TEMPLATES]
    texts += [RELATIONS[f.relation_id][1][t].format(f.subject) for f in facts for t in range(3)]
    texts += [f.attribute for f in facts] + list(PLACES) + list(OBJECTS)
    ordered = list(SPECIAL_TOKENS) + list(NAMES)
    rest = {w for text in texts for w in words(text)} - set(ordered)
    return ordered + sorted(rest)


# ---------------------------------------------------------------------------- evaluation


def predictions(model: Any, tokenizer: Any, prompts: Sequence[str], batch: int = 256) -> list[str]:
    """The model's top-1 next token after each prompt (batched, right padding)."""
    import torch

    out: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            ids = [tokenizer(p)["input_ids"] for p in prompts[i : i + batch]]
            width = max(len(x) for x in ids)
            pad = tokenizer.pad_token_id
            tensor = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
            mask = (tensor != pad).long()
            logits = model(input_ids=tensor, attention_mask=mask).logits  # (B, N, V)
            last = torch.tensor([len(x) - 1 for x in ids])
            top = logits[torch.arange(len(ids)), last].argmax(-1)
            out += tokenizer.convert_ids_to_tokens(top.tolist())
    return out


def accuracy(model: Any, tokenizer: Any, cases: Sequence[IOIPrompt | FactPrompt]) -> float:
    """Top-1 accuracy of ``model`` on ``cases``."""
    got = predictions(model, tokenizer, [c.prompt for c in cases])
    return sum(g == c.answer for g, c in zip(got, cases, strict=True)) / len(cases)


@dataclass(frozen=True)
class Credit:
    """DePass token-level credit at the last position of one prompt, for the predicted
    token and for its rival (the runner-up among the task's possible answers)."""

    prompt: str
    predicted: str
    rival: str
    tokens: list[str]  # input tokens, BOS first
    scores: list[float]  # logit contribution of each input token to ``predicted``
    rival_scores: list[float]  # the same for ``rival``

    @property
    def margin_scores(self) -> list[float]:
        """Each token's contribution to the logit margin ``predicted - rival``."""
        return [a - b for a, b in zip(self.scores, self.rival_scores, strict=True)]


def depass_credit(
    engine: Any, prompt: str, answers: Sequence[str] | None = None, mlp_split: str = "softmax"
) -> Credit:
    """Token-level DePass attribution (BOS rule on; softmax split unless ``mlp_split`` says
    otherwise) at the last position, of the predicted next token and of its rival: the
    highest-scoring other token among ``answers`` (the task's possible answers), or in the
    whole vocabulary."""
    import torch

    from engine import AttributionRequest

    ids = engine.tokenize(prompt)
    logits = engine.trace(ids).last_logits.float()  # (V,)
    predicted = int(logits.argmax())
    allowed = torch.full_like(logits, float("-inf"))
    if answers is None:
        allowed.zero_()
    else:
        allowed[engine.tokenizer.convert_tokens_to_ids(list(answers))] = 0.0
    allowed[predicted] = float("-inf")
    rival = int((logits + allowed).argmax())
    result = engine.attribute(
        AttributionRequest(
            input_ids=ids,
            granularity="token",
            targets=[predicted, rival],
            positions=[-1],
            outputs=["scores"],
            mlp_split=mlp_split,
        )
    )
    scores = result.scores[0]  # (components, targets) at the one position
    return Credit(
        prompt,
        result.target_tokens[0],
        result.target_tokens[1],
        result.tokens,
        scores[:, 0].tolist(),
        scores[:, 1].tolist(),
    )


def ioi_credit(engine: Any, case: IOIPrompt) -> Credit:
    """:func:`depass_credit` of a name-mover prompt; the rival is the other name."""
    return depass_credit(engine, case.prompt, [case.answer, case.repeated])


def fact_credit(
    engine: Any, case: FactPrompt, facts: Sequence[Fact], mlp_split: str = "softmax"
) -> Credit:
    """:func:`depass_credit` of a fact prompt; the rival is the best other attribute of the
    same relation."""
    answers = sorted({f.attribute for f in facts if f.relation_id == case.fact.relation_id})
    return depass_credit(engine, case.prompt, answers, mlp_split)


def top_token(credit: Credit, margin: bool = False) -> str:
    """The input token with the largest score (or margin score), BOS aside."""
    rest = (credit.margin_scores if margin else credit.scores)[1:]
    return credit.tokens[1 + max(range(len(rest)), key=rest.__getitem__)]


def subject_share(credit: Credit, case: FactPrompt, margin: bool = False) -> tuple[float, bool]:
    """(share, largest) of the subject among the input tokens, BOS aside.

    ``share``: the subject tokens' positive scores over all positive scores.
    ``largest``: the subject tokens' summed score exceeds the score of every other single
    input token (the subject, counted as one unit, takes the largest share).
    ``margin``: use the scores of the margin over the rival instead of the logit.
    """
    start, stop = case.subject_words
    rest = (credit.margin_scores if margin else credit.scores)[1:]
    positive = [max(s, 0.0) for s in rest]
    total = sum(positive)
    share = sum(positive[start:stop]) / total if total > 0 else 0.0
    subject = sum(rest[start:stop])
    others = rest[:start] + rest[stop:]
    return share, subject > max(others, default=float("-inf"))
