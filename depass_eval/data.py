"""The evaluation data sets (``data/eval/``, origins in data/README.md) and their prompts.

A data set is named (``known``, ``ioi``, ...) or given as a path to a JSON list of
records with a ``prompt`` and an answer field (``answer``, ``target_token`` or
``attribute``), which is how the tests feed the embedded model its own tasks.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "eval"

#: name -> (file, answer field) of the prompt/answer data sets.
PROMPT_SETS: dict[str, tuple[str, str]] = {
    "known": ("known_1000.json", "attribute"),
    "ioi": ("ioi.json", "target_token"),
    "longra": ("LongRA.json", "target_token"),
    "counterfact": ("counterfact_component.json", "answer"),
    "ioi-component": ("ioi_component.json", "answer"),
}
ANSWER_FIELDS = ("answer", "target_token", "attribute")


@dataclass(frozen=True)
class Case:
    """One prompt and the answer the model should give (its first token is scored)."""

    id: str
    prompt: str
    answer: str


def read_json(name_or_path: str | Path) -> list[dict[str, Any]]:
    """Records of a file of ``data/eval/`` (by name) or of any JSON file (by path)."""
    path = Path(name_or_path)
    if not path.exists():
        path = DATA_DIR / str(name_or_path)
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return records


def load_cases(dataset: str) -> list[Case]:
    """The prompt/answer cases of a named data set or a JSON file, in file order."""
    if dataset in PROMPT_SETS:
        name, field = PROMPT_SETS[dataset]
        records = read_json(name)
    else:
        records = read_json(dataset)
        field = next((f for f in ANSWER_FIELDS if records and f in records[0]), "")
        if not field:
            raise ValueError(f"{dataset}: records need a prompt and one of {ANSWER_FIELDS}")
    return [_case(record, index, field) for index, record in enumerate(records)]


def _case(record: dict[str, Any], index: int, field: str) -> Case:
    key = next((k for k in ("known_id", "case_id", "id") if k in record), None)
    return Case(
        id=str(record[key]) if key else str(index),
        prompt=str(record["prompt"]),
        answer=str(record[field]),
    )


def shuffled(items: list[Any], seed: int, reverse: bool = False) -> Iterator[Any]:
    """``items`` in a seeded random order; ``reverse`` walks that order from its end (the
    tuning slice, disjoint from the test prompts taken from the front)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if reverse:
        order.reverse()
    for index in order:
        yield items[index]
