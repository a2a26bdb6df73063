"""Measure the peak memory of one attribution in a fresh process (used by test_memory.py).

    python tests/memory_probe.py '{"granularity": "token"}' [budget_bytes | smallest] [family]

Prints one JSON line: the engine's estimate (``Plan.working_bytes()``) and the measured
peak resident memory above the level before the request (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``). Run with ``MALLOC_MMAP_THRESHOLD_`` set low so that freed
buffers go back to the system and the peak is what was held at once.
"""

from __future__ import annotations

import gc
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import AttributionRequest, DePassEngine
from engine.testing import tiny_model

TOKENS = 160


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def main() -> None:
    fields = json.loads(sys.argv[1])
    budget_arg = sys.argv[2] if len(sys.argv) > 2 else str(1 << 32)
    family = sys.argv[3] if len(sys.argv) > 3 else "llama"
    torch.set_num_threads(1)
    model = tiny_model(
        family,
        seed=0,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=512,
    )
    ids = torch.randint(4, 512, (TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    request = AttributionRequest(input_ids=ids, **fields)
    if budget_arg == "smallest":  # the least budget that takes the request: smallest chunks
        memory = DePassEngine(model, None, memory_budget_bytes=1 << 40).plan(request).memory
        budget = memory.total - memory.working + memory.working_min
    else:
        budget = int(budget_arg)
    engine = DePassEngine(model, None, memory_budget_bytes=budget, trace_cache_size=0)
    engine.attribute(AttributionRequest(input_ids=ids[:8]))  # load kernels, warm the allocator
    plan = engine.plan(request)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    before = _status("VmRSS")
    result = engine.attribute(request)
    peak = _status("VmHWM") - before
    print(
        json.dumps(
            {
                "budget": budget,
                "estimate": plan.working_bytes(),
                "peak": peak,
                "parts": plan.memory.__dict__,
                "error": result.relative_conservation_error,
            }
        )
    )


if __name__ == "__main__":
    main()
