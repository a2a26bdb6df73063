"""One evaluation run: load the model, pick the DePass source, run a protocol, report."""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from depass_eval import report
from depass_eval.model import EvalModel
from depass_eval.runner import Context, FanOut, finish_run_info, read_rows, write_run_info
from depass_eval.source import DePassSource, LocalDePass, RemoteDePass

if TYPE_CHECKING:
    from depass_batch.options import RayOptions

#: protocol name -> its module in ``depass_eval.protocols`` (``run``, ``summarize``,
#: ``markdown``, ``plot``), imported when used.
PROTOCOLS: dict[str, str] = {
    "tokens": "tokens",
    "truth": "truth",
    "components": "components",
    "language": "language",
}
#: The data set a protocol uses when none is named.
DEFAULT_DATASETS = {
    "tokens": "known",
    "components": "counterfact",
    "truth": "truthfulqa",
    "language": "multilingual",
}


def run_protocol(
    model: str,
    protocol: str,
    out_dir: Path,
    dataset: str | None = None,
    size: int = 200,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    url: str | None = None,
    api_key: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    report_only: bool = False,
    argv: list[str] | None = None,
    loaded: EvalModel | None = None,
    ray: RayOptions | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``protocol`` and write its report; returns the summary.

    ``loaded`` reuses a model already in memory (the tests load the embedded one once).
    ``ray`` fans the prompts out to a Ray Data actor pool (:mod:`depass_eval.fanout`):
    protocols whose per-prompt ``evaluate(ctx, case)`` needs only the run's context
    (tokens, components); truth and language fit a probe first and run here.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    module: ModuleType = importlib.import_module(f"depass_eval.protocols.{PROTOCOLS[protocol]}")
    dataset = dataset or DEFAULT_DATASETS[protocol]
    options = dict(options or {})
    options["exclude"] = _excluded(options.get("exclude_runs", []))
    out_dir = Path(out_dir)
    evaluated = loaded or EvalModel.load(model, threads)
    ctx = Context(
        model=evaluated,
        depass=_source(evaluated, url, api_key),
        out_dir=out_dir,
        seed=seed,
        options=options,
    )
    if ray is not None and not report_only:
        ctx.fan_out = _ray_fan_out(module, protocol, ctx, model, url, threads, ray)
    if not report_only:
        write_run_info(
            out_dir,
            argv or [],
            {
                "model": model,
                "protocol": protocol,
                "dataset": dataset,
                "size": size,
                "seed": seed,
                "rules": options.get("rules") or "strict",
                "depass": "service " + url if url else "in-process engine",
                "options": {k: v for k, v in options.items() if k != "exclude"},
            },
        )
        module.run(ctx, dataset, size, progress)
    rows = read_rows(out_dir)
    summary = module.summarize(ctx, rows)
    rules = options.get("rules") or "strict"
    summary.update({"model": evaluated.name, "dataset": dataset, "seed": seed, "rules": rules})
    title = f"{protocol} on {Path(dataset).stem} ({evaluated.name}, {rules} rules)"
    report.write_results(out_dir, summary, module.markdown(summary, title))
    if rows:
        module.plot(summary, out_dir, title)
    finish_run_info(out_dir, len(rows))
    return summary


def _ray_fan_out(
    module: ModuleType,
    protocol: str,
    ctx: Context,
    model: str,
    url: str | None,
    threads: int | None,
    ray: RayOptions,
) -> FanOut:
    """The Ray fan-out of a run, or a ValueError saying why this run cannot have one."""
    from depass_eval.fanout import ContextSpec, ray_fan_out

    evaluate = getattr(module, "evaluate", None)
    required = [] if evaluate is None else _required_parameters(evaluate)
    if len(required) != 2:  # evaluate(ctx, case), shipped to each actor
        raise ValueError(f"--ray fans out the tokens and components protocols, not {protocol}")
    if url is not None:
        raise ValueError("--ray runs DePass in each actor; it does not combine with --url")
    spec = ContextSpec(
        model=model,
        name=ctx.model.name,
        seed=ctx.seed,
        out_dir=str(ctx.out_dir),
        threads=threads,
        options=ctx.options,
    )
    return ray_fan_out(spec, ray)


def _source(model: EvalModel, url: str | None, api_key: str | None) -> DePassSource:
    """The loaded model's own engine in-process, or the service at ``url``."""
    if url is None:
        return LocalDePass(engine=model.engine)
    from depass_client import Client

    remote = RemoteDePass(client=Client(base_url=url, api_key=api_key))
    probe = model.encode("The capital of France is")
    remote.check_same_model(probe, model.last_logits([probe])[0].numpy())
    return remote


def _excluded(runs: list[str]) -> set[str]:
    """Prompt ids of the runs named by ``--exclude`` (their selection.json)."""
    ids: set[str] = set()
    for run in runs:
        selection = json.loads((Path(run) / "selection.json").read_text(encoding="utf-8"))
        ids |= {case["id"] for case in selection["cases"]}
    return ids


def _required_parameters(function: Callable[..., Any]) -> list[str]:
    """The parameters of ``function`` that have no default."""
    empty = inspect.Parameter.empty
    return [p.name for p in inspect.signature(function).parameters.values() if p.default is empty]
