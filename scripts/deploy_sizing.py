"""GPU memory sizing for docs/deploy.md, from the engine's own estimate.

A replica holds, on its GPU(s)::

    GPU memory ≈ weights + DEPASS_MEMORY_BUDGET_BYTES + overhead

where the weights are parameters x bytes per parameter (bfloat16: 2), the overhead (CUDA
context, allocator) is about 2 GiB, and the budget is everything one request holds
beyond the weights (engine/memory.py): its forward trace, its components, one layer's
frozen values, its snapshots and the chunked working set. Cached traces of other prompts
are evicted to make room, so the cache lives within the budget too. A request whose
estimate does not fit the budget is refused (413 ``memory_budget``) before any model work.

For each request, ``DePassEngine.plan(request).memory`` (``working_bytes()`` is its
total) gives two figures:

- least: the smallest budget that accepts the request: its fixed parts (trace,
  components, frozen layer, snapshots) plus the smallest chunk of work (one component row
  of attention, one position of the MLP);
- most: what it holds when the budget is large enough (1 TiB) for its chunks to reach
  their largest; a budget above it buys that request nothing.

In between, the chunks grow with the budget and the estimate stays within it.

For a prompt of N tokens on a model of L layers, hidden size D, intermediate size I,
H attention heads and vocabulary V (b bytes per element of the weight dtype), one trace
is::

    trace = b (L (2 N D + H N^2 + 2 N I) + 2 N D + V)       (engine/capture.py)

The models are built on the meta device from their published shapes (no weights, no
download) and sized by the real engine, in float32 and bfloat16 components
(DEPASS_COMPUTE_DTYPE) with bfloat16 matrix products (DEPASS_MATMUL_DTYPE=auto on CUDA).
Run ``python scripts/deploy_sizing.py`` to print the table that docs/deploy.md carries
(tests/deploy checks that they agree).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

from engine import AttributionRequest, DePassEngine, MemoryEstimate
from engine.memory import trace_bytes as memory_trace_bytes

GiB = 1024**3

#: Published shapes of common 7B/8B checkpoints (their config.json, abridged).
MODELS: dict[str, PretrainedConfig] = {
    "Llama-2-7B": LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "Llama-3.1-8B": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "Qwen2.5-7B": Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
}

#: Token groups of the grouped column: contiguous spans of the prompt, one component each.
GROUPS = 16

#: A budget large enough that no request is refused and every chunk is at its largest.
UNLIMITED_BUDGET_BYTES = 1024 * GiB

#: The card of the "fits" marks: an 80 GB H100, less the CUDA context and allocator.
GPU_BYTES = 80 * GiB
OVERHEAD_BYTES = 2 * GiB

#: Component dtypes sized (DEPASS_COMPUTE_DTYPE).
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Need:
    """Memory of one request beyond the weights, in bytes."""

    least: int  # the smallest budget that accepts it
    most: int  # its estimate with chunks at their largest (a budget of 1 TiB)


@dataclass(frozen=True)
class Row:
    """Memory of one model at one prompt length and component dtype, in bytes."""

    model: str
    tokens: int
    compute: str  # DEPASS_COMPUTE_DTYPE
    weights: int
    trace: int
    token_last: Need  # token granularity, last position
    token_all: Need  # token granularity, every position
    groups_last: Need  # token granularity, GROUPS groups, last position
    head_last: Need  # head granularity, one layer, last position

    def budget(self, gpu_bytes: int = GPU_BYTES) -> int:
        """The largest budget a ``gpu_bytes`` card leaves beside the weights and overhead."""
        return gpu_bytes - self.weights - OVERHEAD_BYTES


def meta_engine(
    config: PretrainedConfig, budget_bytes: int, compute_dtype: str = "float32"
) -> DePassEngine:
    """The engine around ``config``'s model on the meta device: shapes only, no memory.
    Weights in bfloat16, matrix products in bfloat16 (as DEPASS_MATMUL_DTYPE=auto on CUDA)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=torch.bfloat16
        )
    return DePassEngine(
        model,
        None,
        compute_dtype=getattr(torch, compute_dtype),
        matmul_dtype=torch.bfloat16,
        memory_budget_bytes=budget_bytes,
    )


def trace_bytes(engine: DePassEngine, tokens: int) -> int:
    """Bytes of one ForwardTrace (engine/capture.py) of a ``tokens``-long prompt."""
    return memory_trace_bytes(engine.shape, tokens)


def least_budget(memory: MemoryEstimate) -> int:
    """The smallest budget that accepts a request of estimate ``memory``: its fixed parts
    and the smallest chunk of work (what the chunks shrink to in a tight budget)."""
    return memory.total - memory.working + memory.working_min


def need(engine: DePassEngine, tokens: int, **request: object) -> Need:
    """The engine's own estimate for a request on a ``tokens``-long prompt (``engine``'s
    budget must be large enough to accept it)."""
    plan = engine.plan(AttributionRequest(input_ids=[0] * tokens, **request))
    return Need(least=least_budget(plan.memory), most=plan.working_bytes())


def spans(tokens: int, count: int = GROUPS) -> list[list[int]]:
    """``count`` contiguous groups of positions covering a ``tokens``-long prompt."""
    edges = [round(k * tokens / count) for k in range(count + 1)]
    return [list(range(a, b)) for a, b in itertools.pairwise(edges)]


def rows(
    tokens: Iterable[int] = (512, 2048), compute_dtypes: Iterable[str] = COMPUTE_DTYPES
) -> list[Row]:
    """One row per model, prompt length and component dtype."""
    out: list[Row] = []
    lengths, dtypes = list(tokens), list(compute_dtypes)
    for name, config in MODELS.items():
        engines = {c: meta_engine(config, UNLIMITED_BUDGET_BYTES, c) for c in dtypes}
        first = engines[dtypes[0]]
        weights = sum(p.numel() * p.element_size() for p in first.model.parameters())
        last = first.info.num_layers - 1
        for n, compute in itertools.product(lengths, dtypes):
            engine = engines[compute]
            out.append(
                Row(
                    model=name,
                    tokens=n,
                    compute=compute,
                    weights=weights,
                    trace=trace_bytes(engine, n),
                    token_last=need(engine, n, positions=[-1]),
                    token_all=need(engine, n),
                    groups_last=need(engine, n, groups=spans(n), positions=[-1]),
                    head_last=need(engine, n, granularity="head", start_layer=last, positions=[-1]),
                )
            )
    return out


def markdown(table: list[Row], gpu_bytes: int = GPU_BYTES) -> str:
    """The sizing table of docs/deploy.md (GiB, bfloat16 weights): each request's least
    and most; ✗ where the least is over what a ``gpu_bytes`` card leaves for the budget."""

    def gib(value: int) -> str:
        return f"{value / GiB:.1f}"

    def cell(request: Need, budget: int) -> str:
        text = f"{gib(request.least)} – {gib(request.most)}"
        return text + " ✗" if request.least > budget else text

    lines = [
        "| model | N | components | weights | one trace | budget on an H100 "
        "| token, last position | token, all positions "
        f"| token, {GROUPS} groups, last position | head, one layer, last position |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in table:
        budget = row.budget(gpu_bytes)
        cells = [
            row.model,
            str(row.tokens),
            row.compute,
            gib(row.weights),
            gib(row.trace),
            gib(budget),
            *(
                cell(request, budget)
                for request in (row.token_last, row.token_all, row.groups_last, row.head_last)
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument(
        "--compute-dtypes", nargs="+", choices=COMPUTE_DTYPES, default=list(COMPUTE_DTYPES)
    )
    parser.add_argument(
        "--gpu-gib", type=float, default=GPU_BYTES / GiB, help="GPU memory for the ✗ marks"
    )
    args = parser.parse_args(argv)
    table = rows(args.tokens, args.compute_dtypes)
    print(markdown(table, int(args.gpu_gib * GiB)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
