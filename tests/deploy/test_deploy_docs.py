"""docs/deploy.md's sizing: the table is the script's output, the formulas are the engine's.

The table comes from ``scripts/deploy_sizing.py`` (7B/8B shapes on the meta device, sized
by ``DePassEngine.plan``); the closed forms the page states are checked here against the
engine on a tiny model: ``Plan.working_bytes()`` and ``ForwardTrace.nbytes()``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from types import ModuleType

import pytest
from deploy_support import REPO

from engine import AttributionRequest, DePassEngine
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


@pytest.mark.parametrize(
    "request_fields",
    [
        {},
        {"positions": [-1]},
        {"granularity": "head", "start_layer": 1, "positions": [-1, -2]},
        {"granularity": "module", "module": "mlp", "start_layer": 0},
        {"groups": [[0, 1], [2, 3, 4]], "positions": [-1]},
        {"all_layers": True, "positions": [-1]},
    ],
    ids=["token", "token-last", "head", "module", "groups", "all-layers"],
)
def test_working_formula_is_the_engines(
    engine: DePassEngine, request_fields: dict[str, object]
) -> None:
    """working = 4 (2 (M+1) N D + S P (M+1) D) + budget, as docs/deploy.md states."""
    n = 7
    plan = engine.plan(AttributionRequest(input_ids=list(range(4, 4 + n)), **request_fields))
    m, s, p, d = plan.components, plan.snapshots, len(plan.positions), engine.info.hidden_size
    stated = 4 * (2 * (m + 1) * n * d + s * p * (m + 1) * d) + engine.memory_budget_bytes
    assert plan.working_bytes() == stated
