"""``depass-eval --ray``: a protocol's prompts fanned out to a Ray Data actor pool.

Each actor loads the model, its DePass engine and the baselines once
(:meth:`ContextSpec.build`, the context the in-process run has) and runs the protocol's
per-prompt function (``evaluate(ctx, case)``, a module-level function shipped by
reference) on the prompts it is handed. The rows come back to the driver as they finish
and are written by the same resumable loop as in-process (:func:`depass_eval.runner.run_rows`),
so a stopped run started again skips the prompts already written. The pool is
:func:`depass_batch.runner.actor_pool_batches`'s, with the same checks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from depass_batch.options import RayOptions
from depass_batch.runner import actor_pool_batches, actor_threads
from depass_eval.model import EvalModel
from depass_eval.runner import Context, FanOut, jsonable
from depass_eval.source import LocalDePass

#: A protocol's per-prompt function: its context and one case in, its row (or None) out.
Evaluate = Callable[[Context, dict[str, Any]], "dict[str, Any] | None"]


@dataclass(frozen=True)
class ContextSpec:
    """What an actor needs to build the in-process run's :class:`Context` itself."""

    model: str
    name: str
    seed: int
    out_dir: str
    threads: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Context:
        """The model (in float32, eager), DePass on it in-process, the run's options."""
        evaluated = EvalModel.load(self.model, self.threads, self.name)
        return Context(
            model=evaluated,
            depass=LocalDePass(engine=evaluated.engine),
            out_dir=Path(self.out_dir),
            seed=self.seed,
            options=dict(self.options),
        )


class EvalWorker:
    """One actor: a built context, and the protocol's function on batches of cases."""

    def __init__(self, spec: ContextSpec, evaluate: Evaluate) -> None:
        self.ctx = spec.build()
        self.evaluate = evaluate

    def __call__(self, batch: Any) -> Any:
        """``key`` and ``case`` (JSON) in; ``key`` and ``row`` (JSON, ``null``: skipped) out."""
        import pyarrow as pa

        out = []
        for item in batch.to_pylist():
            row = self.evaluate(self.ctx, json.loads(item["case"]))
            out.append({"key": item["key"], "row": json.dumps(row, default=jsonable)})
        return pa.Table.from_pylist(out)


def ray_fan_out(spec: ContextSpec, options: RayOptions) -> FanOut:
    """A :data:`depass_eval.runner.FanOut` on a Ray Data pool of ``options.actors``."""

    def fan_out(evaluate: Evaluate, todo: list[dict[str, Any]]) -> Iterator[tuple[Any, Any]]:
        if not todo:
            return
        threads = spec.threads or actor_threads(options)
        worker_kwargs = {"spec": dataclasses.replace(spec, threads=threads), "evaluate": evaluate}
        items = [{"key": str(i), "case": json.dumps(case)} for i, case in enumerate(todo)]
        for batch in actor_pool_batches(items, EvalWorker, worker_kwargs, 1, options):
            for result in batch.to_pylist():
                yield todo[int(result["key"])], json.loads(result["row"])

    return fan_out
