"""Reverse mode against the forward strategy, in the same run, on SmolLM2-135M (CPU).

    python benchmarks/reverse_bench.py                      # every row (minutes)
    python benchmarks/reverse_bench.py --rows token --sizes 128
    python benchmarks/reverse_bench.py --model models/depass-tiny --sizes 64   # seconds

Each row runs in its own subprocess (its peak resident memory is its own): one warm-up
where it is cheap, then ``--repeats`` timed runs; medians are printed. Rows:

- ``token``: token-level taylor attribution of the last position, forward vs reverse at
  each of ``--sizes``, the same prompt; the ratio and the largest score difference
  (relative to the largest score) are printed.
- ``long``: reverse alone at ``--long-sizes``, divided by the time of one plain forward
  pass of the model on the same ids (any gradient method costs about 3 of those).
- ``sweep``: all heads of all layers and all neurons of all layers at ``--sweep-size``:
  reverse vs forward (forward neurons: the layers it does in ``--forward-budget-s``,
  extrapolated to all layers and marked so).
- ``captum``: Captum's integrated gradients (16 steps) and gradient x input on the same
  prompts, for scale.

Output: one JSON line per measurement, then a table of the ratios.
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
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

TEXT = (
    "The history of the city begins with a small settlement by the river, where traders "
    "met to exchange grain, salt and cloth. Over the centuries it grew into a market town "
)


def _model_path(name: str) -> str:
    if name != "smollm2":
        return name
    import real_models

    return str(real_models.gguf_path("smollm2"))


def _ids(engine: Any, length: int) -> list[int]:
    """``length`` token ids of a repeated English text (the same for every row)."""
    ids = engine.tokenize(TEXT * (1 + length // 20))
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def _timed(fn: Any, repeats: int, warm: bool) -> tuple[float, Any]:
    if warm:
        fn()
    times, out = [], None
    for _ in range(repeats):
        clock = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - clock)
    return statistics.median(times), out


def measure(row: str, model: str, size: int, repeats: int, budget_s: float) -> dict[str, Any]:
    """One measurement, in this process (the parent runs each in a subprocess)."""
    from engine import AttributionRequest, DePassEngine

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    engine = DePassEngine.from_pretrained(_model_path(model), trace_cache_size=0)
    ids = _ids(engine, size)
    out: dict[str, Any] = {"row": row, "model": model, "tokens": size}

    def attribute(strategy: str, **fields: Any) -> Any:
        request = AttributionRequest(
            input_ids=ids, mlp_split="taylor", strategy=strategy, positions=[-1], **fields
        )
        return engine.attribute(request)

    if row == "token":
        out["forward_s"], forward = _timed(lambda: attribute("forward"), repeats, size <= 128)
        out["reverse_s"], reverse = _timed(lambda: attribute("reverse"), repeats, True)
        scale = float(forward.scores.abs().max())
        out["max_difference"] = float((forward.scores - reverse.scores).abs().max()) / scale
        out["speedup"] = out["forward_s"] / out["reverse_s"]
    elif row == "long":
        batch = torch.tensor([ids])

        def plain() -> None:
            with torch.no_grad():
                engine.model(batch, use_cache=False, logits_to_keep=1)

        out["plain_forward_s"], _ = _timed(plain, repeats, True)
        out["reverse_s"], result = _timed(lambda: attribute("reverse"), repeats, False)
        out["over_plain_forward"] = out["reverse_s"] / out["plain_forward_s"]
        out["relative_conservation_error"] = result.relative_conservation_error
        out["budget_gib"] = engine.memory_budget_bytes / 1024**3
    elif row == "sweep":
        layers = list(range(engine.info.num_layers))
        heads = {"granularity": "head", "start_layer": layers}
        out["heads_reverse_s"], _ = _timed(lambda: attribute("reverse", **heads), repeats, True)
        out["heads_forward_s"], _ = _timed(lambda: attribute("forward", **heads), 1, False)
        neurons = {"granularity": "neuron", "start_layer": layers}
        out["neurons_reverse_s"], _ = _timed(lambda: attribute("reverse", **neurons), repeats, True)
        done, clock = 0, time.perf_counter()
        for layer in reversed(layers):  # later layers are cheaper: start at the end
            attribute("forward", granularity="neuron", start_layer=layer)
            done += 1
            if time.perf_counter() - clock > budget_s:
                break
        spent = time.perf_counter() - clock
        out["neurons_forward_layers_done"] = done
        out["neurons_forward_s_extrapolated"] = spent * len(layers) / done
        out["heads_speedup"] = out["heads_forward_s"] / out["heads_reverse_s"]
        out["neurons_speedup_at_least"] = spent / done * len(layers) / out["neurons_reverse_s"]
    elif row == "captum":
        from captum.attr import InputXGradient, IntegratedGradients

        embed = engine.model.get_input_embeddings()
        inputs = embed(torch.tensor([ids])).detach()
        with torch.no_grad():
            target = int(engine.model(torch.tensor([ids])).logits[0, -1].argmax())

        def forward(x: torch.Tensor) -> torch.Tensor:
            return engine.model(inputs_embeds=x, use_cache=False).logits[:, -1]

        ig = IntegratedGradients(forward)
        gxi = InputXGradient(forward)
        out["ig16_s"], _ = _timed(
            lambda: ig.attribute(inputs, target=target, n_steps=16, internal_batch_size=4),
            repeats,
            False,
        )
        out["grad_x_input_s"], _ = _timed(
            lambda: gxi.attribute(inputs, target=target), repeats, True
        )
        out["reverse_s"], _ = _timed(lambda: attribute("reverse"), repeats, True)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, or a model path")
    parser.add_argument("--rows", default="token,long,sweep,captum")
    parser.add_argument("--sizes", default="128,512", help="token row: prompt lengths")
    parser.add_argument("--long-sizes", default="2048,4096")
    parser.add_argument("--sweep-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forward-budget-s", type=float, default=120.0)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row, size = args.child.split(":")
        out = measure(row, args.model, int(size), args.repeats, args.forward_budget_s)
        print(json.dumps(out))
        return
    plan: list[tuple[str, int]] = []
    for row in args.rows.split(","):
        if row == "token":
            plan += [("token", int(n)) for n in args.sizes.split(",")]
        elif row == "long":
            plan += [("long", int(n)) for n in args.long_sizes.split(",")]
        elif row == "sweep":
            plan.append(("sweep", args.sweep_size))
        elif row == "captum":
            plan += [("captum", int(n)) for n in args.sizes.split(",")]
    results = []
    for row, size in plan:
        command = [sys.executable, __file__, "--model", args.model, "--repeats", str(args.repeats)]
        command += ["--forward-budget-s", str(args.forward_budget_s), "--child", f"{row}:{size}"]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=args.timeout_s, check=False
            )
            lines = done.stdout.strip().splitlines()
            out = (
                json.loads(lines[-1])
                if done.returncode == 0 and lines
                else {"row": row, "tokens": size, "error": done.stderr.strip().splitlines()[-1:]}
            )
        except subprocess.TimeoutExpired:
            out = {"row": row, "tokens": size, "error": f"over {args.timeout_s:.0f} s"}
        print(json.dumps(out), flush=True)
        results.append(out)
    print("\nrow      N      ratio")
    names = {
        "speedup": "forward / reverse",
        "over_plain_forward": "reverse / one plain forward pass",
        "heads_speedup": "heads forward / reverse",
        "ig16_s": "IG-16 seconds",
    }
    for out in results:
        key = next((k for k in names if k in out), None)
        text = out.get("error", "?") if key is None else f"{out[key]:9.2f}  {names[key]}"
        print(f"{out['row']:<8} {out['tokens']:<6} {text}")


if __name__ == "__main__":
    main()
