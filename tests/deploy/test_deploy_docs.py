"""docs/deploy.md's sizing: the table is the script's output, the figures are the engine's.

The table comes from ``scripts/deploy_sizing.py`` (7B/8B shapes on the meta device, sized
by ``DePassEngine.plan``); what the page states is checked here against the engine on a
tiny model: the trace's closed form (``ForwardTrace.nbytes()``), ``Plan.working_bytes()``
as the sum of the estimate's parts, and the least budget the table gives as the one the
engine accepts and refuses one byte under.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from types import ModuleType

import pytest
from deploy_support import REPO

from engine import AttributionRequest, DePassEngine, MemoryBudgetError
from engine.testing import tiny_model, word_tokenizer

DOCS = REPO / "docs" / "deploy.md"


@pytest.fixture(scope="module")
def sizing() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "deploy_sizing", REPO / "scripts" / "deploy_sizing.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engine() -> DePassEngine:
    return DePassEngine(tiny_model("llama", seed=3), word_tokenizer(), memory_budget_bytes=1 << 20)


def test_docs_table_is_the_scripts_output(sizing: ModuleType) -> None:
    text = DOCS.read_text()
    match = re.search(r"<!-- sizing-table:begin -->\n(.*?)\n<!-- sizing-table:end -->", text, re.S)
    assert match, "docs/deploy.md lost its sizing-table markers"
    assert match.group(1) == sizing.markdown(sizing.rows()), (
        "docs/deploy.md's sizing table is stale: paste `python scripts/deploy_sizing.py`"
    )


def test_trace_formula_is_the_engines(sizing: ModuleType, engine: DePassEngine) -> None:
    for length in (3, 11):
        ids = list(range(4, 4 + length))
        assert sizing.trace_bytes(engine, length) == engine.trace(ids).nbytes()


REQUESTS = [
    {},
    {"positions": [-1]},
    {"granularity": "head", "start_layer": 1, "positions": [-1, -2]},
    {"granularity": "module", "module": "mlp", "start_layer": 0},
    {"groups": [[0, 1], [2, 3, 4]], "positions": [-1]},
    {"all_layers": True, "positions": [-1]},
]
REQUEST_IDS = ["token", "token-last", "head", "module", "groups", "all-layers"]


def _engine(engine: DePassEngine, budget_bytes: int, **kwargs: object) -> DePassEngine:
    """The fixture's model behind another budget (and dtypes)."""
    return DePassEngine(engine.model, None, memory_budget_bytes=budget_bytes, **kwargs)


@pytest.mark.parametrize("request_fields", REQUESTS, ids=REQUEST_IDS)
def test_working_bytes_is_the_estimate(
    sizing: ModuleType, engine: DePassEngine, request_fields: dict[str, object]
) -> None:
    """working_bytes() is the estimate's total, the sum of its parts; the components of a
    float32 engine are (M + 1) N D x 4 bytes (twice for heads: their outputs before they
    are placed); the trace part holds the trace."""
    n = 7
    big = _engine(engine, sizing.UNLIMITED_BUDGET_BYTES)
    body = AttributionRequest(input_ids=list(range(4, 4 + n)), **request_fields)
    plan = big.plan(body)
    memory = plan.memory
    parts = memory.trace + memory.components + memory.frozen_layer + memory.snapshots
    assert plan.working_bytes() == memory.total == parts + memory.working
    m, d = plan.components, engine.info.hidden_size
    copies = 2 if request_fields.get("granularity") == "head" else 1
    assert memory.components == copies * (m + 1) * n * d * 4
    assert memory.trace > sizing.trace_bytes(engine, n) > 0
    assert 0 < memory.working_min <= memory.working


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("request_fields", REQUESTS, ids=REQUEST_IDS)
def test_least_budget_is_the_engines(
    sizing: ModuleType, engine: DePassEngine, request_fields: dict[str, object], compute: str
) -> None:
    """The table's least budget is accepted (the estimate then within it) and one byte
    less is refused with MemoryBudgetError; a larger budget gives the chunks more room, up
    to the table's most."""
    import torch

    dtype = getattr(torch, compute)
    body = AttributionRequest(input_ids=list(range(4, 4 + 7)), **request_fields)
    most = _engine(engine, sizing.UNLIMITED_BUDGET_BYTES, compute_dtype=dtype).plan(body)
    least = sizing.least_budget(most.memory)
    assert least <= most.working_bytes()
    plan = _engine(engine, least, compute_dtype=dtype).plan(body)
    assert plan.working_bytes() <= least
    with pytest.raises(MemoryBudgetError) as refused:
        _engine(engine, least - 1, compute_dtype=dtype).plan(body)
    assert refused.value.budget_bytes == least - 1
    assert refused.value.estimate.total > least - 1
    middle = _engine(engine, (least + most.working_bytes()) // 2, compute_dtype=dtype).plan(body)
    assert plan.working_bytes() <= middle.working_bytes() <= most.working_bytes()


def test_table_marks_what_does_not_fit(sizing: ModuleType) -> None:
    """A ✗ exactly where a request's least budget is over what the card leaves."""
    row = sizing.Row(
        model="m",
        tokens=8,
        compute="float32",
        weights=10 * sizing.GiB,
        trace=sizing.GiB,
        token_last=sizing.Need(least=68 * sizing.GiB, most=70 * sizing.GiB),
        token_all=sizing.Need(least=68 * sizing.GiB + 1, most=70 * sizing.GiB),
        groups_last=sizing.Need(least=sizing.GiB, most=sizing.GiB),
        head_last=sizing.Need(least=sizing.GiB, most=2 * sizing.GiB),
    )
    line = sizing.markdown([row]).splitlines()[-1]
    assert line == (
        "| m | 8 | float32 | 10.0 | 1.0 | 68.0 | 68.0 – 70.0 | 68.0 – 70.0 ✗ | 1.0 – 1.0 "
        "| 1.0 – 2.0 |"
    )
