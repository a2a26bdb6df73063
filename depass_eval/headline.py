"""The headline table of several ``tokens`` runs: ``python -m depass_eval.headline RUN...``.

One row per method, one patch/recover AUC pair per run (a data set), and the seconds per
prompt of the first run; DePass's variants first. Reads each run's ``results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from depass_eval.report import table


def headline(runs: list[Path]) -> str:
    """A Markdown table of patch-top / recover-top AUCs per method and run."""
    results: list[dict[str, Any]] = [json.loads((run / "results.json").read_text()) for run in runs]
    methods = list(results[0]["methods"])
    methods.sort(key=lambda m: (not m.startswith("depass"), m))
    headers = ["method"]
    for result in results:
        name = f"{result['dataset']} (n={result['prompts']})"
        headers += [f"{name} patch AUC ↑", f"{name} recover AUC ↓"]
    headers.append(f"s / prompt ({results[0]['dataset']})")
    rows = []
    for method in methods:
        row: list[Any] = [method]
        for result in results:
            entry = result["methods"].get(method)
            row += [entry["patch"]["auc"], entry["recover"]["auc"]] if entry else ["", ""]
        row.append(round(results[0]["methods"][method]["seconds_per_prompt"], 2))
        rows.append(row)
    return table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+", help="output folders of tokens runs")
    print(headline(parser.parse_args().runs))


if __name__ == "__main__":
    main()
