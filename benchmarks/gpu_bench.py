"""GPU timings of the engine on random-weight models built from a config (no downloads).

    python benchmarks/gpu_bench.py                       # Llama-2-7B and Llama-3.1-8B shapes
    python benchmarks/gpu_bench.py --shape small         # a tiny shape; runs on the CPU too
    python benchmarks/gpu_bench.py --shape llama2-7b --workloads token-256,heads-512

One JSON line per workload: ``workload``, ``n`` (prompt tokens), ``seconds`` (median of
``--repeats`` after one warm-up; every run includes the model's own forward pass: the
trace cache is off), ``runs``, ``peak_gib`` (peak allocated device memory during the
runs, weights included; CPU: peak RSS of the process), ``weights_gib``, ``budget_gib``
(the engine's working budget), ``estimate_gib`` (the engine's own estimate, made before
any work), ``within_budget`` (peak minus weights at most the budget), ``device``,
``dtype`` (weights), ``compute_dtype`` (components), ``matmul_dtype``, ``compile``,
``flop_limit_s`` (the causal-half FLOP count over ``--peak-tflops``), ``flop_limit_ratio``
(seconds / flop_limit_s) and the conservation error. ``batch-*`` workloads time several
small requests one by one and as one batch in the same run (``seconds_alone``,
``seconds``, ``speedup``, ``max_abs_diff``). A request over the budget prints
``refused`` with the estimate (nothing ran); any other failure prints its error, and the
run goes on.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import AttributionRequest, DePassEngine, MemoryBudgetError

SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "llama3.1-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
    },
    "small": {
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}

#: workload name -> (kind, prompt length, component dtype); kinds: token (last position),
#: heads (every layer, one request), neurons (every neuron of one middle layer), batch
#: (BATCH token requests of that length, one by one and batched); reverse-token,
#: reverse-heads, reverse-neurons: the reverse strategy (taylor split, last position):
#: token, every head of every layer, every neuron of every layer (top 100 kept).
WORKLOADS: dict[str, dict[str, tuple[str, int, str]]] = {
    "llama2-7b": {
        "token-128": ("token", 128, "float32"),
        "token-256": ("token", 256, "float32"),
        "token-512": ("token", 512, "float32"),
        "token-2048": ("token", 2048, "bfloat16"),
        "token-2048-fp32": ("token", 2048, "float32"),
        "heads-512": ("heads", 512, "float32"),
        "neurons-64": ("neurons", 64, "float32"),
        "batch-16x32": ("batch", 32, "float32"),
        "reverse-token-512": ("reverse-token", 512, "float32"),
        "reverse-token-2048": ("reverse-token", 2048, "float32"),
        "reverse-token-8192": ("reverse-token", 8192, "bfloat16"),
        "reverse-heads-512": ("reverse-heads", 512, "float32"),
        "reverse-neurons-512": ("reverse-neurons", 512, "float32"),
    },
    "llama3.1-8b": {
        "token-256": ("token", 256, "float32"),
        "reverse-token-2048": ("reverse-token", 2048, "float32"),
    },
    "small": {
        "token-32": ("token", 32, "float32"),
        "heads-32": ("heads", 32, "float32"),
        "neurons-8": ("neurons", 8, "float32"),
        "batch-16x8": ("batch", 8, "float32"),
        "reverse-token-32": ("reverse-token", 32, "float32"),
        "reverse-heads-32": ("reverse-heads", 32, "float32"),
        "reverse-neurons-8": ("reverse-neurons", 8, "float32"),
    },
}

#: requests per batch workload
BATCH = 16


def build_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A random-weight Llama of ``shape`` directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], attn_implementation="eager", tie_word_embeddings=False)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for param in model.parameters():  # well-scaled weights, norms around 1
            if param.ndim == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    return model.eval()


def causal_flops(info: Any, kind: str, n: int, components: int) -> float:
    """FLOPs of the causal half of the work (method page's cost model), all layers run."""
    d, i = info.hidden_size, info.intermediate_size
    d_kv = info.num_kv_heads * info.head_dim
    per_pair = 2 * d * d_kv + 2 * d * d + 4 * d * i + 2 * d * n  # multiply-adds
    if kind.startswith("reverse"):  # one frozen pass and its backward: ~3 plain passes
        per_position = 2 * d * d_kv + 2 * d * d + 6 * d * i + 2 * d * n
        return 2.0 * 3 * n * per_position * info.num_layers
    if kind in ("token", "batch"):
        pairs, layers = n * (n + 1) / 2 + n, info.num_layers
    elif kind == "heads":  # each start layer runs the rest of the network
        pairs = components * n
        layers = sum(info.num_layers - s for s in range(info.num_layers))
    else:
        pairs, layers = components * n, info.num_layers // 2
    return 2.0 * pairs * per_pair * layers


def request_for(kind: str, ids: list[int], info: Any) -> AttributionRequest:
    if kind.startswith("reverse"):
        layers = list(range(info.num_layers))
        fields: dict[str, Any] = {
            "reverse-token": {},
            "reverse-heads": {"granularity": "head", "start_layer": layers},
            "reverse-neurons": {"granularity": "neuron", "start_layer": layers, "top_k": 100},
        }[kind]
        return AttributionRequest(
            input_ids=ids, positions=[-1], mlp_split="taylor", strategy="reverse", **fields
        )
    if kind in ("token", "batch"):
        return AttributionRequest(input_ids=ids, positions=[-1])
    if kind == "heads":
        layers = list(range(info.num_layers))
        return AttributionRequest(
            input_ids=ids, granularity="head", start_layer=layers, positions=[-1]
        )
    return AttributionRequest(
        input_ids=ids, granularity="neuron", start_layer=info.num_layers // 2, positions=[-1]
    )


def peak_memory(device: str) -> Callable[[], float]:
    """Reset the peak counter; return a function that reads it in GiB."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return lambda: torch.cuda.max_memory_allocated() / 2**30
    return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _timed(device: str, fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Run ``fn`` once to warm up, then ``repeats`` timed times; the last value too."""
    fn()
    seconds, value = [], None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        clock = time.perf_counter()
        value = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - clock)
    return seconds, value


def run_workload(
    engine: DePassEngine, name: str, kind: str, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Time one workload; the line of JSON fields it reports."""
    info = engine.info
    generator = torch.Generator().manual_seed(n)
    count = BATCH if kind == "batch" else 1
    prompts = [
        torch.randint(4, info.vocab_size, (n,), generator=generator).tolist() for _ in range(count)
    ]
    requests = [request_for(kind, ids, info) for ids in prompts]
    plan = engine.plan(requests[0])  # refuses (MemoryBudgetError) before any work
    line: dict[str, Any] = {"workload": name, "n": n}
    if kind == "batch":
        alone, singles = _timed(
            args.device, lambda: [engine.attribute(r) for r in requests], args.repeats
        )
        read_peak = peak_memory(args.device)
        seconds, results = _timed(
            args.device, lambda: engine.attribute_many(requests), args.repeats
        )
        difference = max(
            float((a.scores - b.scores).abs().max()) for a, b in zip(results, singles, strict=True)
        )
        line.update(
            requests=count,
            seconds_alone=round(statistics.median(alone), 4),
            speedup=round(statistics.median(alone) / statistics.median(seconds), 2),
            batch_size=results[0].timings["batch_size"],
            max_abs_diff=difference,
        )
        result = results[0]
    else:
        read_peak = peak_memory(args.device)
        seconds, result = _timed(args.device, lambda: engine.attribute(requests[0]), args.repeats)
    median = statistics.median(seconds)
    flops = causal_flops(info, kind, n, plan.components + 1) * count
    limit = flops / (args.peak_tflops * 1e12)
    peak = read_peak()
    line.update(
        seconds=round(median, 4),
        runs=[round(s, 4) for s in seconds],
        peak_gib=round(peak, 2),
        budget_gib=round(engine.memory_budget_bytes / 2**30, 2),
        estimate_gib=round(plan.working_bytes() / 2**30, 2),
        device=_device_name(args.device),
        dtype=info.dtype,
        compute_dtype=str(engine.compute_dtype).removeprefix("torch."),
        matmul_dtype=str(engine.matmul_dtype).removeprefix("torch."),
        compile=engine.compile,
        components=plan.components,
        flop_limit_s=float(f"{limit:.3g}"),
        flop_limit_ratio=round(median / limit, 2),
        relative_conservation_error=result.relative_conservation_error,
        strategy=result.strategy,
    )
    return line


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append")
    parser.add_argument("--workloads", help="comma-separated names (default: all of the shape)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="weights: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument(
        "--matmul-dtype", default=None, help="matrix products (default: the weights' dtype)"
    )
    parser.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="engine working budget (default: CUDA: device memory - weights - 4 GiB; CPU: 16)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fuse the softmax split with torch.compile (default: on with CUDA)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=800.0)
    args = parser.parse_args()
    shapes = args.shape or ["llama2-7b", "llama3.1-8b"]
    on_gpu = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    matmul = getattr(torch, args.matmul_dtype) if args.matmul_dtype else dtype
    compile_split = on_gpu if args.compile is None else args.compile
    for shape in shapes:
        model = build_model(shape, args.device, dtype)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        if args.budget_gib is not None:
            budget = int(args.budget_gib * 2**30)
        elif on_gpu:
            budget = (
                torch.cuda.get_device_properties(args.device).total_memory - weights - 4 * 2**30
            )
        else:
            budget = 16 * 2**30
        engines: dict[str, DePassEngine] = {}
        wanted = args.workloads.split(",") if args.workloads else list(WORKLOADS[shape])
        for name in wanted:
            kind, n, compute = WORKLOADS[shape][name]
            if compute not in engines:
                engines.clear()  # one engine (and its compiled split) at a time
                engines[compute] = DePassEngine(
                    model,
                    compute_dtype=getattr(torch, compute),
                    matmul_dtype=matmul,
                    memory_budget_bytes=budget,
                    trace_cache_size=0,
                    compile=compile_split,
                )
            engine = engines[compute]
            try:
                line = run_workload(engine, name, kind, n, args)
                line["within_budget"] = line["peak_gib"] * 2**30 - weights <= budget or not on_gpu
            except MemoryBudgetError as exc:
                line = {"workload": name, "n": n, "refused": str(exc)[:400]}
            except (torch.OutOfMemoryError, RuntimeError, ValueError) as exc:
                line = {"workload": name, "n": n, "error": f"{type(exc).__name__}: {exc}"[:300]}
                if on_gpu:
                    torch.cuda.empty_cache()
            line.update(shape=shape, weights_gib=round(weights / 2**30, 2), torch=torch.__version__)
            print(json.dumps(line), flush=True)
        engines.clear()
        del model
        if on_gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
