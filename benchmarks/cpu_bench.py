"""Time the engine against the naive implementation, in the same run, on random weights.

    python benchmarks/cpu_bench.py --reference-seconds 8.1   # d512 / 8 layers, N=128
    python benchmarks/cpu_bench.py --shape small                # seconds; what CI runs

Each implementation runs in its own subprocess (so that its peak resident memory is its
own): one warm-up, then ``--repeats`` timed runs of a token-level decomposition from layer
0 (softmax split); the median is reported. Implementations: ``naive`` (written straight
from the method page), ``engine`` (every position's states), ``engine-compiled`` (the
same with the softmax split fused by ``torch.compile``; its one-off compilation falls in
the warm-up), and ``engine-last``/``engine-last-compiled`` (the last position's states
only, as a request with ``positions=[-1]`` gets them: the engine skips the last layer's
work at the other positions; the public reference returns every position). The parent
then checks that naive and engine states agree, and that
the last-position run equals the last row of the full one. Output: one JSON line per
implementation and a summary line with the speed-ups over naive (and, given
``--reference-seconds``, over the reference's time measured outside the project).
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


_ENGINES: dict[tuple[int, bool], object] = {}


def run_engine(
    model: torch.nn.Module, ids: list[int], last_only: bool = False, compile: bool = False
) -> torch.Tensor:
    """Token decomposition of every position (or of the last), states (P, M, D)."""
    from engine import AttributionRequest, DePassEngine

    key = (id(model), compile)
    if key not in _ENGINES:  # one engine per model, as a service keeps it (and its kernels)
        _ENGINES[key] = DePassEngine(model, trace_cache_size=0, compile=compile)
    engine = _ENGINES[key]
    positions = [-1] if last_only else None
    # the first-token rule on, as the naive implementation (and the reference) applies it
    request = AttributionRequest(
        input_ids=ids, outputs=["states"], positions=positions, ignore_bos=True
    )
    return engine.attribute(request).states


def run_naive(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    from naive import naive_token_decomposition

    states, _remainder = naive_token_decomposition(model, ids)
    return states


#: what each timed implementation computes (all: states at every position)
IMPLEMENTATIONS = {
    "naive": run_naive,
    "engine": run_engine,
    "engine-compiled": lambda model, ids: run_engine(model, ids, compile=True),
    "engine-last": lambda model, ids: run_engine(model, ids, last_only=True),
    "engine-last-compiled": lambda model, ids: run_engine(model, ids, True, True),
}


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
        "positions": "last" if "last" in impl else "all",
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
    parser.add_argument(
        "--impls",
        default="naive,engine,engine-compiled,engine-last,engine-last-compiled",
        help="comma-separated implementations to time (naive and engine always run)",
    )
    parser.add_argument(
        "--reference-seconds",
        type=float,
        default=None,
        help="the public reference's time on this machine, measured outside the project "
        "(8.1 s for d512/N=128 here): the summary adds the ratios to it",
    )
    parser.add_argument("--only", choices=sorted(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.only:  # child process: one implementation
        print(json.dumps(measure(args.only, args.shape, args.repeats)))
        return

    lines = {}
    wanted = list(dict.fromkeys(["naive", "engine", *args.impls.split(",")]))
    for impl in wanted:
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
        naive_states = run_naive(model, ids)
        engine_states = run_engine(model, ids)
        difference = float((engine_states - naive_states).abs().max())
        magnitude = float(engine_states.abs().max())
        last = run_engine(model, ids, last_only=True)
        last_difference = float((last[0] - engine_states[-1]).abs().max())
    summary = {
        "summary": "engine vs naive",
        "shape": args.shape,
        "n": len(ids),
        "speedup": round(lines["naive"]["seconds"] / lines["engine"]["seconds"], 2),
        "speedups": {
            impl: round(lines["naive"]["seconds"] / line["seconds"], 2)
            for impl, line in lines.items()
            if impl != "naive"
        },
        "max_abs_diff": difference,
        "max_rel_diff": difference / magnitude,
        "last_position_max_abs_diff": last_difference,
        "engine_peak_rss_mib": lines["engine"]["peak_rss_mib"],
        "naive_peak_rss_mib": lines["naive"]["peak_rss_mib"],
    }
    if args.reference_seconds:
        summary["vs_reference"] = {
            impl: round(args.reference_seconds / line["seconds"], 2)
            for impl, line in lines.items()
            if impl != "naive"
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
