"""The headline table of several ``tokens`` runs: ``python -m depass_eval.headline RUN...``.

One row per method, one patch/recover AUC pair per data set, and the seconds per prompt
on the first data set; DePass's variants first. Reads each run's ``results.json``.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+", help="output folders of tokens runs")
    print(headline(parser.parse_args().runs))


if __name__ == "__main__":
    main()
