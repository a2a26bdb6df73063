"""Copy the DePass paper's evaluation data sets into data/eval/, sampling the large ones.

Small files are copied whole; the large ones are sampled with a fixed seed (record order
kept), so the copy is reproducible: ``python scripts/copy_eval_data.py ../shared/data``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "eval"
SEED = 251018462
#: file -> records kept (None: all). Sampled where the whole file is over ~500 kB.
FILES: dict[str, int | None] = {
    "known_1000.json": None,
    "ioi.json": None,
    "LongRA.json": None,
    "truthful_train.json": None,
    "truthful_test.json": None,
    "truthfulqa.json": 300,
    "counterfact_component.json": 1500,
    "ioi_component.json": None,
    "counterfact_multilingual.json": 300,
    "language_probe_train.json": None,
    "language_probe_test.json": None,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path, help="folder with the shared data files")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, keep in FILES.items():
        records = json.loads((args.source / name).read_text(encoding="utf-8"))
        if keep is not None and keep < len(records):
            chosen = sorted(random.Random(SEED).sample(range(len(records)), keep))
            records = [records[i] for i in chosen]
        text = json.dumps(records, ensure_ascii=False, indent=0)
        (OUT / name).write_text(text + "\n", encoding="utf-8")
        print(f"{name}: {len(records)} records, {len(text.encode()) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
