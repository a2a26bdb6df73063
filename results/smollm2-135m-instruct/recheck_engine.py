"""Re-score the rows of a token run with the current engine: do its DePass rankings still
stand? (The first rows of tokens-known and tokens-ioi were computed before the eligibility
fix of issue 11; the later ones after it.)

Usage: .venv/bin/python results/smollm2-135m-instruct/recheck_engine.py <gguf> <run dir> <rows>
Prints, per DePass variant, the largest score change over the first <rows> rows and how
many prompts' rankings of the middle tokens (what patch/recover-top use) changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from depass_eval.model import EvalModel, load_model
from depass_eval.perturb import ranked_middle
from depass_eval.source import LocalDePass, Split
from engine import DePassEngine


def main() -> None:
    model_path, run, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    model, tokenizer = load_model(model_path, threads=1)
    evaluated = EvalModel(model, tokenizer, name=Path(model_path).name)
    depass = LocalDePass(engine=DePassEngine(model, tokenizer))
    rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()][:count]
    print(f"{run.name}: first {len(rows)} rows")
    for rule in ("softmax", "relu", "max", "linear", "taylor"):
        split = Split(rule=rule)
        worst, changed = 0.0, 0
        for row in rows:
            ids = evaluated.encode(row["prompt"])
            answer = evaluated.answer_id(row["answer"])
            new = depass.token_scores(ids, answer, split)
            old = np.asarray(row["scores"][split.label])
            worst = max(worst, float(np.abs(new - old).max()))
            changed += ranked_middle(np.round(new, 5)) != ranked_middle(old)
        print(
            f"  {split.label}: max |score change| {worst:.2e}, "
            f"rankings changed {changed}/{len(rows)}"
        )


if __name__ == "__main__":
    main()
