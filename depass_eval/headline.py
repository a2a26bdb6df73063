"""The headline table of several ``tokens`` runs: ``python -m depass_eval.headline RUN...``.

One row per method, one patch/recover AUC pair per data set, and the seconds per prompt
on the first data set; DePass's variants first. Reads each run's ``results.json``.

``--side-by-side STRICT PAPER``: one data set under both rules, each AUC with its
standard error, and where DePass's best variant stands against the best baseline in each.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from depass_eval.report import table


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
                f" {verdict(result, mode, c)}."
            )
    return "\n".join(lines)


def verdict(result: dict[str, Any], mode: str, comparison: dict[str, Any]) -> str:
    """``wins``, ``loses`` or ``ties``: a tie when the two AUCs differ by less than twice
    the standard error of their difference (taken as independent: conservative, the
    prompts are shared)."""
    errors = [
        result["methods"][comparison[key]][mode].get("auc_sem", 0.0)
        for key in ("best_depass", "best_baseline")
    ]
    gap = comparison["best_depass_auc"] - comparison["best_baseline_auc"]
    if abs(gap) < 2 * math.hypot(*errors):
        return "ties (within twice the standard error)"
    return "wins" if comparison["depass_wins"] else "loses"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+", help="output folders of tokens runs")
    parser.add_argument(
        "--side-by-side", action="store_true", help="two runs: STRICT PAPER of one data set"
    )
    args = parser.parse_args()
    if args.side_by_side:
        if len(args.runs) != 2:
            parser.error("--side-by-side takes two runs: STRICT PAPER")
        print(side_by_side(*args.runs))
        return
    print(headline(args.runs))


if __name__ == "__main__":
    main()
