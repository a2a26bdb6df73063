"""Re-score the rows of a token run with the current engine: do its DePass rankings still
stand? (The first rows of tokens-known and tokens-ioi were computed before the eligibility
fix of issue 11, the later ones after it.)

Usage: .venv/bin/python results/smollm2-135m-instruct/recheck_engine.py \
    <gguf> <run dir> <rows> [--write]

<rows>: ``N`` (the first N rows) or ``A:B`` (rows A..B-1). Prints, per DePass variant, the
largest score change over those rows and how many prompts' rankings of the middle tokens
(what patch/recover-top use) changed. ``--write``: replace those rows' DePass scores and
patch/recover curves with the current engine's (the baselines do not depend on it; each
rewritten row records the commit in ``rescored``), then rebuild the report with
``run_all.sh <gguf> report``. Only while no run writes to the folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from depass_eval import perturb
from depass_eval.model import EvalModel
from depass_eval.source import LocalDePass, Split

RULES = ("softmax", "relu", "max", "linear", "taylor")


def main() -> None:
    model_path, run, span = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    write = "--write" in sys.argv[4:]
    lo, hi = (int(v) for v in span.split(":")) if ":" in span else (0, int(span))
    evaluated = EvalModel.load(model_path, threads=1, name=Path(model_path).name)
    depass = LocalDePass(engine=evaluated.engine)
    path = run / "rows.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(f"{run.name}: rows {lo}..{min(hi, len(rows)) - 1}")
    worst = dict.fromkeys(RULES, 0.0)
    changed = dict.fromkeys(RULES, 0)
    for row in rows[lo:hi]:
        ids = evaluated.encode(row["prompt"])
        answer = evaluated.answer_id(row["answer"])
        fresh: dict[str, np.ndarray] = {}
        for rule in RULES:
            split = Split(rule=rule)
            new = depass.token_scores(ids, answer, split)
            old = np.asarray(row["scores"][split.label])
            worst[rule] = max(worst[rule], float(np.abs(new - old).max()))
            changed[rule] += perturb.ranked_middle(np.round(new, 5)) != perturb.ranked_middle(old)
            fresh[split.label] = new
        if write:
            curves = perturb.curves(evaluated, ids, answer, row["answer_prob"], fresh)
            for label, scores in fresh.items():
                row["scores"][label] = np.round(scores.astype(np.float64), 5).tolist()
                row["curves"][label] = curves[label]
            row["rescored"] = commit
    for rule in RULES:
        print(
            f"  depass-{rule}: max |score change| {worst[rule]:.2e}, "
            f"rankings changed {changed[rule]}/{len(rows[lo:hi])}"
        )
    if write:
        temporary = path.with_suffix(".rescored")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
        temporary.replace(path)
        print(f"  rewrote rows {lo}..{min(hi, len(rows)) - 1} of {path}")


if __name__ == "__main__":
    main()
