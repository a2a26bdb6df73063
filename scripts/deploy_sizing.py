"""GPU memory sizing for docs/deploy.md, from the engine's own estimate.

A replica holds, on its GPU(s)::

    weights            parameters x bytes per parameter (bfloat16: 2)
  + traces             forward traces kept by the LRU cache (at least the one in use)
  + working            Plan.working_bytes() of the request being decomposed

with, for a prompt of N tokens on a model of L layers, hidden size D, intermediate size I,
H attention heads and vocabulary V (b bytes per element of the weight dtype)::

    trace   = b (L (2 N D + H N^2 + 2 N I) + 2 N D + V)       (engine/capture.py)
    working = 4 (2 (M + 1) N D + S P (M + 1) D) + DEPASS_MEMORY_BUDGET_BYTES

where M is the number of components (N for token granularity, H + 1 for heads), P the
positions returned and S the layer snapshots (engine/engine.py, Plan.working_bytes).

The models are built on the meta device from their published shapes (no weights, no
download) and sized by the real engine: ``DePassEngine.plan(request).working_bytes()``.
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

from engine import AttributionRequest, DePassEngine

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

#: The service's default working budget (DEPASS_MEMORY_BUDGET_BYTES).
DEFAULT_BUDGET_BYTES = 2 * GiB


@dataclass(frozen=True)
class Row:
    """Memory of one model at one prompt length, in bytes."""

    model: str
    tokens: int
    weights: int
    trace: int
    token_last: int  # working bytes: token granularity, last position
    token_all: int  # working bytes: token granularity, every position
    groups_last: int  # working bytes: token granularity, GROUPS groups, last position
    head_last: int  # working bytes: head granularity, one layer, last position


def meta_engine(config: PretrainedConfig, budget_bytes: int) -> DePassEngine:
    """The engine around ``config``'s model on the meta device: shapes only, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=torch.bfloat16
        )
    return DePassEngine(model, None, memory_budget_bytes=budget_bytes)


def trace_bytes(engine: DePassEngine, tokens: int) -> int:
    """Bytes of one ForwardTrace (engine/capture.py) of a ``tokens``-long prompt."""
    info = engine.info
    n, d, i, h = tokens, info.hidden_size, info.intermediate_size, info.num_heads
    per_layer = 2 * n * d + h * n * n + 2 * n * i  # resid_pre, resid_mid, probs, gate, act
    elements = info.num_layers * per_layer + 2 * n * d + info.vocab_size
    element = torch.finfo(getattr(torch, info.dtype)).bits // 8
    return elements * element + 8 * n  # + the int64 input ids


def working_bytes(engine: DePassEngine, tokens: int, **request: object) -> int:
    """The engine's own estimate for a request on a ``tokens``-long prompt."""
    body = AttributionRequest(input_ids=[0] * tokens, **request)
    return engine.plan(body).working_bytes()


def spans(tokens: int, count: int = GROUPS) -> list[list[int]]:
    """``count`` contiguous groups of positions covering a ``tokens``-long prompt."""
    edges = [round(k * tokens / count) for k in range(count + 1)]
    return [list(range(a, b)) for a, b in itertools.pairwise(edges)]


def rows(
    tokens: Iterable[int] = (512, 2048), budget_bytes: int = DEFAULT_BUDGET_BYTES
) -> list[Row]:
    """One row per model and prompt length."""
    out: list[Row] = []
    for name, config in MODELS.items():
        engine = meta_engine(config, budget_bytes)
        weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        last = engine.info.num_layers - 1
        for n in tokens:
            out.append(
                Row(
                    model=name,
                    tokens=n,
                    weights=weights,
                    trace=trace_bytes(engine, n),
                    token_last=working_bytes(engine, n, positions=[-1]),
                    token_all=working_bytes(engine, n),
                    groups_last=working_bytes(engine, n, groups=spans(n), positions=[-1]),
                    head_last=working_bytes(
                        engine, n, granularity="head", start_layer=last, positions=[-1]
                    ),
                )
            )
    return out


def markdown(table: list[Row]) -> str:
    """The sizing table of docs/deploy.md (GiB, bfloat16 weights, default budget)."""

    def gib(value: int) -> str:
        return f"{value / GiB:.1f}"

    lines = [
        "| model | N | weights | one trace | token, last position | token, all positions "
        f"| token, {GROUPS} groups, last position | head, one layer, last position |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in table:
        cells = [
            row.model,
            str(row.tokens),
            gib(row.weights),
            gib(row.trace),
            gib(row.token_last),
            gib(row.token_all),
            gib(row.groups_last),
            gib(row.head_last),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--budget-bytes", type=int, default=DEFAULT_BUDGET_BYTES)
    args = parser.parse_args(argv)
    print(markdown(rows(args.tokens, args.budget_bytes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
