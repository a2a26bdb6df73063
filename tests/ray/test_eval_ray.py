"""``depass-eval --ray``: a protocol's prompts on a pool of 2 actors give the in-process rows.

The tokens protocol on held-out name-mover prompts of the embedded model, with one split
rule and one baseline: a run stopped after two prompts and carried on on Ray (each prompt
evaluated by an actor that holds its own model, engine and baselines) keeps the rows it
had and adds the in-process rows of the others.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from depass_batch.options import RayOptions
from depass_eval import run_protocol
from depass_eval.runner import read_rows

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "models" / "depass-tiny")
sys.path.insert(0, str(REPO / "scripts"))

import default_model_tasks as tasks  # noqa: E402

OPTIONS = {"splits": ["softmax"], "baselines": ["gradient-x-input"], "ig_steps": 4}
SIZE = 4


@pytest.fixture(scope="module")
def ioi_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out name-mover prompts of the embedded model (tests/eval's data set)."""
    cases = enumerate(tasks.held_out_ioi(40))
    records = [{"id": i, "prompt": c.prompt, "answer": c.answer} for i, c in cases]
    path = tmp_path_factory.mktemp("data") / "name_mover.json"
    path.write_text(json.dumps(records))
    return path


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A row without its timings."""
    return {k: v for k, v in row.items() if k not in ("seconds", "perturb_seconds")}


def test_tokens_on_ray_give_the_in_process_rows(
    ray_cluster: str, ioi_file: Path, tmp_path: Path
) -> None:
    here = tmp_path / "here"
    run_protocol(TINY, "tokens", here, str(ioi_file), SIZE, options=OPTIONS, progress=False)
    expected = {row["id"]: comparable(row) for row in read_rows(here)}
    # A run stopped after two prompts (its selection and first rows), carried on on Ray.
    there = tmp_path / "there"
    there.mkdir()
    shutil.copy(here / "selection.json", there / "selection.json")
    lines = (here / "rows.jsonl").read_text().splitlines(keepends=True)
    (there / "rows.jsonl").write_text("".join(lines[:2]))
    ray = RayOptions(address=ray_cluster, actors=2)
    run_protocol(
        TINY, "tokens", there, str(ioi_file), SIZE, options=OPTIONS, progress=False, ray=ray
    )

    rows = read_rows(there)
    assert len(rows) == len({row["id"] for row in rows}) == SIZE
    assert rows[:2] == read_rows(here)[:2]  # kept, not run again
    for row in rows[2:]:
        got, want = comparable(row), expected[row["id"]]
        assert got.keys() == want.keys()
        assert got["tokens"] == want["tokens"]
        assert got["answer_prob"] == pytest.approx(want["answer_prob"], rel=1e-6)
        for method, scores in want["scores"].items():
            assert got["scores"][method] == pytest.approx(scores, abs=2e-5), method
        assert got["curves"].keys() == want["curves"].keys()
    assert (there / "results.json").exists() and (there / "summary.md").exists()


def test_ray_is_refused_where_it_cannot_fan_out(ray_cluster: str, tmp_path: Path) -> None:
    ray = RayOptions(address=ray_cluster, actors=2)
    with pytest.raises(ValueError, match="fans out the tokens and components protocols"):
        run_protocol(TINY, "truth", tmp_path, size=2, progress=False, ray=ray)
