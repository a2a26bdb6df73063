"""The headline table of several ``tokens`` runs: ``python -m depass_eval.headline RUN...``.

One row per method, one patch/recover AUC pair per data set, and the seconds per prompt
on the first data set; DePass's variants first. Reads each run's ``results.json``.

``--side-by-side STRICT PAPER``: one data set under both rules, each AUC with its
standard error, and where DePass's best variant stands against the best baseline in each.

``--verdicts RUN...``: per run and curve, DePass's best variant against every other method
(each baseline, each peer) with the same tie rule, one line per curve.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from depass_eval.report import HIGHER_IS_BETTER, best_first, table, verdict


def headline(runs: list[Path]) -> str:
    """A Markdown table of patch-top / recover-top AUCs per method and data set.

    Runs on the same data set and the same prompts (e.g. the baselines' run and a run of
    more DePass variants) share its columns; a method missing from a data set is blank.
    """
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs:
        result = json.loads((run / "results.json").read_text())
        key = (result["dataset"], result["prompts"])
        merged.setdefault(key, {}).update(result["methods"])
    methods = list(dict.fromkeys(m for entries in merged.values() for m in entries))
    methods.sort(key=lambda m: (not m.startswith("depass"), m))
    headers = ["method"]
    for dataset, prompts in merged:
        name = f"{dataset} (n={prompts})"
        headers += [f"{name} patch AUC ↑", f"{name} recover AUC ↓"]
    first = next(iter(merged))
    headers.append(f"s / prompt ({first[0]})")
    rows = []
    for method in methods:
        row: list[Any] = [method]
        for entries in merged.values():
            entry = entries.get(method)
            row += [entry["patch"]["auc"], entry["recover"]["auc"]] if entry else ["", ""]
        timed = merged[first].get(method)
        row.append(round(timed["seconds_per_prompt"], 2) if timed else "")
        rows.append(row)
    return table(headers, rows)


def side_by_side(strict: Path, paper: Path) -> str:
    """A Markdown table of one data set's tokens runs under the strict and the paper's
    rules: patch and recover AUC ± standard error per method (blank where a run lacks
    the method), then one line per rules on the best DePass variant against the best
    baseline."""
    runs = {
        "strict": json.loads((strict / "results.json").read_text()),
        "paper": json.loads((paper / "results.json").read_text()),
    }
    methods = list(dict.fromkeys(m for r in runs.values() for m in r["methods"]))
    methods.sort(key=lambda m: (not m.startswith("depass"), m))

    def cell(result: dict[str, Any], method: str, mode: str) -> str:
        entry = result["methods"].get(method)
        if not entry:
            return ""
        return f"{entry[mode]['auc']:.3f} ± {entry[mode]['auc_sem']:.3f}"

    headers = ["method"]
    for mode, arrow in (("patch", "↑"), ("recover", "↓")):
        for rules, result in runs.items():
            headers.append(f"{mode} AUC {arrow} {rules} (n={result['prompts']})")
    rows = [
        [method, *[cell(r, method, mode) for mode in ("patch", "recover") for r in runs.values()]]
        for method in methods
    ]
    lines = [table(headers, rows), ""]
    for rules, result in runs.items():
        for mode, c in (result.get("comparison") or {}).items():
            if mode not in ("patch", "recover"):
                continue
            lines.append(
                f"- {rules}, {mode}-top: `{c['best_depass']}` {c['best_depass_auc']:.3f} vs"
                f" `{c['best_baseline']}` {c['best_baseline_auc']:.3f}: DePass"
                f" {_explained(verdict(result, mode, c['best_depass'], c['best_baseline']))}."
            )
    return "\n".join(lines)


def verdicts(run: Path) -> str:
    """A Markdown list for one tokens run: per curve, DePass's best variant against every
    non-DePass method (baselines and peers alike), best first, each with its verdict."""
    result = json.loads((run / "results.json").read_text())
    methods = result["methods"]
    depass = [m for m in methods if m.startswith("depass")]
    others = [m for m in methods if not m.startswith("depass")]
    lines = [f"## {run.name} ({result.get('rules', 'strict')} rules, n={result['prompts']})", ""]
    if not depass or not others:
        return "\n".join(lines)
    for mode in HIGHER_IS_BETTER:
        ours = best_first(methods, depass, mode)[0]
        against = [
            f"`{other}` {_auc(methods[other], mode)}: {verdict(result, mode, ours, other)}"
            for other in best_first(methods, others, mode)
        ]
        lines.append(
            f"- {mode}-top, `{ours}` {_auc(methods[ours], mode)} against " + "; ".join(against)
        )
    return "\n".join(lines)


def _auc(entry: dict[str, Any], mode: str) -> str:
    """An AUC with its standard error, three decimals."""
    return f"{entry[mode]['auc']:.3f} ± {entry[mode].get('auc_sem', 0.0):.3f}"


def _explained(word: str) -> str:
    """A verdict with its tie rule spelt out."""
    return f"{word} (within twice the standard error)" if word == "ties" else word


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+", help="output folders of tokens runs")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument(
        "--side-by-side", action="store_true", help="two runs: STRICT PAPER of one data set"
    )
    shape.add_argument(
        "--verdicts",
        action="store_true",
        help="per run: DePass's best variant against every other method, per curve",
    )
    args = parser.parse_args()
    if args.verdicts:
        print("\n\n".join(verdicts(run) for run in args.runs))
        return
    if args.side_by_side:
        if len(args.runs) != 2:
            parser.error("--side-by-side takes two runs: STRICT PAPER")
        print(side_by_side(*args.runs))
        return
    print(headline(args.runs))


if __name__ == "__main__":
    main()
