"""Parts own their maths: the propagation loop names no weight tensor (issue 21).

The attention and MLP parts (engine/parts.py) give their frozen operators; the modules
that run them read no ``.weight`` or ``.bias`` and keep no projection of their own, so
that a new attention or expert layout is a new part type, not an edit of the loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "engine"

#: The modules that run the parts' frozen operators.
LOOP_MODULES = ("propagate.py", "reverse.py")

#: Attributes that read a module's parameters.
PARAMETERS = {"weight", "bias"}

#: Names of projections the loop once kept itself (attributes or variables).
PROJECTIONS = {"w_v", "w_o", "w_gate", "w_down"}


def _weight_reads(path: Path) -> list[str]:
    """``file:line: name`` of every ``.weight``/``.bias`` access and every projection name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in PARAMETERS | PROJECTIONS:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name) and node.id in PROJECTIONS:
            found.append((node.lineno, node.id))
    return [f"{path.name}:{line}: {name}" for line, name in sorted(found)]


@pytest.mark.parametrize("module", LOOP_MODULES)
def test_the_loop_reads_no_weight(module: str) -> None:
    assert _weight_reads(ENGINE / module) == []


def test_the_check_finds_a_weight_read(tmp_path: Path) -> None:
    """The check itself sees what it forbids."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f(m):\n    w_o = m.o_proj.weight\n    return w_o @ m.bias\n")
    assert _weight_reads(probe) == [
        "probe.py:2: w_o",
        "probe.py:2: weight",
        "probe.py:3: bias",
        "probe.py:3: w_o",
    ]
