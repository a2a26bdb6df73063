"""The run loop every protocol shares: resumable, with a progress bar, results as they come.

A run writes into its output folder:

- ``rows.jsonl``: one JSON line per finished prompt, flushed as it is written, so an
  interrupted run loses at most the prompt in progress; a restart with the same folder
  skips every prompt already there;
- ``selection.json``: the prompts chosen (for protocols that keep only the prompts the
  model answers correctly, with how many were screened), so a restart does not re-screen;
- ``run.json``: the command, the date, the machine and the library versions;
- ``results.json`` (every number), ``summary.md`` and ``*.png``, written at the end from
  all the rows (also by ``--report-only`` on a folder).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depass_eval.data import Case, shuffled
from depass_eval.model import EvalModel
from depass_eval.source import DePassSource

ROWS = "rows.jsonl"
SELECTION = "selection.json"
#: Runs a protocol's per-prompt function (``evaluate(ctx, case)``) on the prompts not yet
#: done somewhere else (``depass-eval --ray``: :mod:`depass_eval.fanout`), yielding
#: ``(case, row)`` pairs as they finish.
FanOut = Callable[[Callable[..., Any], list[Any]], Iterable[tuple[Any, Any]]]


@dataclass
class Context:
    """What a protocol works with; ``fan_out`` set: its prompts run there."""

    model: EvalModel
    depass: DePassSource
    out_dir: Path
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    fan_out: FanOut | None = None


def done_ids(out_dir: Path) -> set[str]:
    """Ids of the prompts already in ``rows.jsonl`` (a torn last line is ignored)."""
    return {row["id"] for row in read_rows(out_dir)}


def read_rows(out_dir: Path) -> list[dict[str, Any]]:
    """Every complete row of ``rows.jsonl``."""
    path = out_dir / ROWS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line being written when the run was stopped
    return rows


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (no newline) left by an interrupted write."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def run_rows(
    items: Iterable[Any],
    total: int,
    key: Callable[[Any], str],
    work: Callable[[Any], dict[str, Any] | None],
    out_dir: Path,
    progress: bool = True,
    fan_out: Callable[[list[Any]], Iterable[tuple[Any, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Run ``work`` on each item not done yet and append its row; return all rows.

    ``work`` returning None skips the item (nothing is written). ``fan_out`` runs the
    items not done elsewhere instead, yielding ``(item, row)`` as they finish.
    """
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ROWS
    _repair_tail(path)
    done = done_ids(out_dir)
    todo = [item for item in items if key(item) not in done]
    results = fan_out(todo) if fan_out is not None else ((item, work(item)) for item in todo)
    bar = tqdm(total=total, initial=len(done), disable=not progress, unit="prompt")
    with path.open("a", encoding="utf-8") as sink:
        for item, row in results:
            if row is None or key(item) in done:
                continue
            sink.write(json.dumps(row, default=jsonable) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            done.add(key(item))
            bar.update()
    bar.close()
    return read_rows(out_dir)


def select_correct(
    ctx: Context,
    cases: list[Case],
    size: int,
    reverse: bool = False,
    exclude: AbstractSet[str] = frozenset(),
) -> dict[str, Any]:
    """The first ``size`` cases, in seeded random order, whose answer's first token is the
    model's top-1 next token; screened in batches. Cached in ``selection.json``."""
    path = ctx.out_dir / SELECTION
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    order = [c for c in shuffled(cases, ctx.seed, reverse) if c.id not in exclude]
    chosen: list[dict[str, Any]] = []
    screened = 0
    batch = 64
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        ids = [ctx.model.encode(case.prompt) for case in chunk]
        top = ctx.model.last_logits(ids).argmax(-1).tolist()
        for case, predicted in zip(chunk, top, strict=True):
            if len(chosen) == size:
                break
            screened += 1
            if predicted == ctx.model.answer_id(case.answer):
                chosen.append({"id": case.id, "prompt": case.prompt, "answer": case.answer})
        if len(chosen) == size:
            break
    selection = {
        "screened": screened,
        "correct": len(chosen),
        "accuracy": len(chosen) / max(screened, 1),
        "order": "reversed (tuning slice)" if reverse else "seeded shuffle",
        "excluded": len(exclude),
        "cases": chosen,
    }
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(selection, indent=1), encoding="utf-8")
    return selection


def write_run_info(out_dir: Path, argv: list[str], extra: dict[str, Any]) -> None:
    """``run.json``: command, date, machine, versions (kept from the first start; each
    restart is appended to ``starts``)."""
    import transformers

    path = out_dir / "run.json"
    info = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info.setdefault("command", " ".join(["depass-eval", *argv]))
    info.setdefault("started", now)
    info.setdefault("starts", []).append(now)
    info["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": _git_commit(),
    }
    info.update(extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1), encoding="utf-8")


def finish_run_info(out_dir: Path, rows: int) -> None:
    """Record when the report was written and from how many rows."""
    path = out_dir / "run.json"
    info = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    info["reported"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info["rows"] = rows
    path.write_text(json.dumps(info, indent=1), encoding="utf-8")


def _git_commit() -> str | None:
    """The checkout's commit (the engine version that made the numbers), if in git."""
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def jsonable(value: Any) -> Any:
    """numpy and torch values as JSON (``json.dumps(default=jsonable)``)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_correct(
    ctx: Context,
    cases: list[Case],
    size: int,
    evaluate: Callable[[Context, dict[str, Any]], dict[str, Any] | None],
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Screen ``cases`` for ``size`` correct ones (the tuning slice and ``--exclude``
    from the options) and run ``evaluate(ctx, case)`` on each, here or on
    ``ctx.fan_out``; the rows."""
    selection = select_correct(
        ctx,
        cases,
        size,
        reverse=ctx.options.get("tuning_slice", False),
        exclude=ctx.options.get("exclude", set()),
    )
    chosen = selection["cases"]
    fan_out = ctx.fan_out
    return run_rows(
        chosen,
        len(chosen),
        lambda c: c["id"],
        lambda c: evaluate(ctx, c),
        ctx.out_dir,
        progress,
        None if fan_out is None else (lambda todo: fan_out(evaluate, todo)),
    )


def run_in_order(
    ctx: Context,
    cases: list[Case],
    size: int,
    work: Callable[[dict[str, Any]], dict[str, Any] | None],
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run ``work`` on the first ``size`` cases in file order, whether the model answers
    them or not (the paper's rule); ``selection.json`` records them."""
    path = ctx.out_dir / SELECTION
    if path.exists():
        chosen = json.loads(path.read_text(encoding="utf-8"))["cases"]
    else:
        chosen = [{"id": c.id, "prompt": c.prompt, "answer": c.answer} for c in cases[:size]]
        selection = {"screened": len(chosen), "order": "file order, unfiltered", "cases": chosen}
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(selection, indent=1), encoding="utf-8")
    return run_rows(chosen, len(chosen), lambda c: c["id"], work, ctx.out_dir, progress)


def run_records(
    ctx: Context,
    records: list[dict[str, Any]],
    size: int,
    work: Callable[[dict[str, Any]], dict[str, Any] | None],
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run ``work`` on the first ``size`` records (keyed by ``case_id``) in the seeded
    order; the rows."""
    chosen = list(shuffled(records, ctx.seed))[:size]
    key: Callable[[dict[str, Any]], str] = lambda r: str(r["case_id"])  # noqa: E731
    return run_rows(chosen, len(chosen), key, work, ctx.out_dir, progress)
