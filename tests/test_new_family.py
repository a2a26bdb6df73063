"""Adding a family is one new file: in a scratch copy of the repository, a Llama-shaped
family (SmolLM3, which transformers has and the engine does not register) is added as
``engine/families/smollm3.py`` and nothing else; the registry finds it and every family
test runs on it and passes: each test that runs on Qwen3 (a Llama-shaped family that no
test picks by hand) runs on SmolLM3 too.

This is the procedure of docs/engine.md ("Adding a family"), run as a contributor would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: The whole contribution: its parts (Llama's defaults) and its tiny test model.
NEW_FAMILY = '''"""SmolLM3: Llama's parts; its layers without rotary embeddings (NoPE) only
shape the frozen attention probabilities."""

from engine.families.base import TINY_SPECIAL_IDS, Family, TinyConfig

FAMILY = Family(
    name="smollm3",
    architectures=("SmolLM3ForCausalLM",),
    tiny=TinyConfig({**TINY_SPECIAL_IDS, "no_rope_layers": [1, 0]}),
)
'''

#: The family test files (the registry-derived matrix of tests/conftest.py).
FAMILY_TESTS = (
    "tests/test_families.py",
    "tests/test_conservation.py",
    "tests/test_causality.py",
    "tests/test_reverse.py",
)


def _scratch_copy(into: Path) -> Path:
    """The engine, the tests and what conftest.py loads, copied as they are now."""
    for part in ("engine", "tests", "scripts"):
        shutil.copytree(
            REPO / part, into / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    shutil.copy(REPO / "pyproject.toml", into / "pyproject.toml")
    return into


def _pytest(clone: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _test_ids(output: str) -> set[str]:
    return {line.strip() for line in output.splitlines() if "::" in line}


def test_a_new_llama_shaped_family_is_one_file(tmp_path: Path) -> None:
    clone = _scratch_copy(tmp_path / "clone")
    assert not (clone / "engine/families/smollm3.py").exists()
    (clone / "engine/families/smollm3.py").write_text(NEW_FAMILY, encoding="utf-8")

    listed = _pytest(clone, "--collect-only", "-q", *FAMILY_TESTS)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    ids = _test_ids(listed.stdout)
    as_qwen3 = re.compile(r"(?<=[\[-])qwen3(?=[\]-])")
    qwen3_ids = {i for i in ids if as_qwen3.search(i)}
    assert len(qwen3_ids) >= 20, f"too few family tests run on Qwen3: {qwen3_ids}"
    expected = {as_qwen3.sub("smollm3", i) for i in qwen3_ids}
    missing = expected - ids
    assert not missing, f"family tests that run on Qwen3 but not on the new family: {missing}"

    ran = _pytest(clone, "-q", "-x", "-k", "smollm3", *FAMILY_TESTS)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-2000:]
    passed = re.search(r"(\d+) passed", ran.stdout)
    assert passed and int(passed.group(1)) >= len(expected), ran.stdout[-2000:]


@pytest.mark.parametrize("content", ["VALUE = 1\n", "FAMILY = 'llama'\n"])
def test_a_family_module_without_a_family_fails_loudly(tmp_path: Path, content: str) -> None:
    """A file in engine/families/ must declare a ``FAMILY``: a stray module is an error at
    import, not a family silently left out."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "engine", clone / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "engine/families/stray.py").write_text(content, encoding="utf-8")
    found = subprocess.run(
        [sys.executable, "-c", "import engine.families"],
        cwd=clone,
        env={**os.environ, "PYTHONPATH": str(clone)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert found.returncode != 0
    assert "engine.families.stray declares no FAMILY" in found.stderr
