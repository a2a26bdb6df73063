"""Time the engine against the naive implementation, in the same run, on random weights.

    python benchmarks/cpu_bench.py                 # d512 / 8-layer Llama, N=128, 2 threads
    python benchmarks/cpu_bench.py --shape small   # seconds; what CI runs

Each implementation runs in its own subprocess (so that its peak resident memory is its
own): one warm-up, then ``--repeats`` timed runs of a token-level decomposition from layer
0 (softmax split); the median is reported. The parent then runs both once more on the same
model and prompt and checks that the states agree. Output: one JSON line per
implementation and a summary line with the speed-up ratio and the largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

#: Llama shapes: the d512 one is the 29.5M-parameter model the reference was timed on.
SHAPES: dict[str, dict[str, int]] = {
    "d512": {
        "vocab_size": 4096,
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "tokens": 128,
    },
    "small": {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tokens": 32,
    },
}


def build(shape: str, seed: int = 0) -> tuple[torch.nn.Module, list[int]]:
    """A random-weight Llama of ``shape`` (eager attention) and a random prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(SHAPES[shape])
    tokens = settings.pop("tokens")
    torch.manual_seed(seed)
    config = LlamaConfig(**settings, attn_implementation="eager", tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(
        4, settings["vocab_size"], (tokens,), generator=torch.Generator().manual_seed(seed)
    )
    return model, ids.tolist()


def run_engine(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    from engine import AttributionRequest, DePassEngine

    engine = DePassEngine(model, trace_cache_size=0)
    result = engine.attribute(AttributionRequest(input_ids=ids, outputs=["states"]))
    return result.states


def run_naive(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    from naive import naive_token_decomposition

    states, _remainder = naive_token_decomposition(model, ids)
    return states


IMPLEMENTATIONS = {"engine": run_engine, "naive": run_naive}


def measure(impl: str, shape: str, repeats: int) -> dict[str, object]:
    """Warm up once, time ``repeats`` runs, report the median and the peak RSS."""
    model, ids = build(shape)
    run = IMPLEMENTATIONS[impl]
    with torch.inference_mode():
        run(model, ids)
        seconds = []
        for _ in range(repeats):
            clock = time.perf_counter()
            run(model, ids)
            seconds.append(time.perf_counter() - clock)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "workload": "token",
        "impl": impl,
        "shape": shape,
        "n": len(ids),
        "seconds": statistics.median(seconds),
        "runs": [round(s, 4) for s in seconds],
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="d512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=sorted(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.only:  # child process: one implementation
        print(json.dumps(measure(args.only, args.shape, args.repeats)))
        return

    lines = {}
    for impl in ("naive", "engine"):
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--shape",
                args.shape,
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
                "--only",
                impl,
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ},
        )
        lines[impl] = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(lines[impl]), flush=True)

    model, ids = build(args.shape)
    with torch.inference_mode():
        engine_states = run_engine(model, ids)
        difference = float((engine_states - run_naive(model, ids)).abs().max())
        magnitude = float(engine_states.abs().max())
    print(
        json.dumps(
            {
                "summary": "engine vs naive",
                "shape": args.shape,
                "n": len(ids),
                "speedup": round(lines["naive"]["seconds"] / lines["engine"]["seconds"], 2),
                "max_abs_diff": difference,
                "max_rel_diff": difference / magnitude,
                "engine_peak_rss_mib": lines["engine"]["peak_rss_mib"],
                "naive_peak_rss_mib": lines["naive"]["peak_rss_mib"],
            }
        )
    )


if __name__ == "__main__":
    main()
