"""The README's and docs/*.md's examples, run on the embedded model and held to the output
they print (doctest-style), so that the next drift between the docs and the code fails.

Collected from the Markdown itself: every ``python`` block directly followed by a
``text`` block (its output), and every ``text`` block that starts with ``$ depass`` (a
command and its output). Blocks for other models (a hub id, a GGUF file, a GPU) are left
out. Python runs in this process (``Client()`` finds the service through
``DEPASS_BASE_URL``); commands run as the installed ``depass`` against the embedded model
served by ``python -m service`` under uvicorn. Text must match exactly; numbers within
1e-4 relative or 1e-5 absolute (float sums differ in the last digits by thread count).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.service.conftest import serve

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EMBEDDED = REPO / "models" / "depass-tiny"
#: Words that mark a block for another model than the embedded one.
OTHER_MODELS = re.compile(r"smollm2|gemma|gguf|meta-llama|Qwen/|cuda", re.IGNORECASE)
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
NUMBER = re.compile(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?|[-+]?\d+e[-+]?\d+")


@dataclass(frozen=True)
class Example:
    """A runnable block of a Markdown file and the output it shows."""

    where: str  # file:line
    kind: str  # "python" or "command"
    code: str
    output: str


def examples() -> list[Example]:
    found = []
    for path in DOCS:
        text = path.read_text()
        blocks = list(BLOCK.finditer(text))
        for block, after in zip(blocks, [*blocks[1:], None], strict=False):
            lang, body = block.group(1), block.group(2)
            where = f"{path.relative_to(REPO)}:{text[: block.start()].count(chr(10)) + 1}"
            if OTHER_MODELS.search(body):
                continue
            if lang == "text" and re.match(r"\$ (\.venv/bin/)?depass ", body):
                command, _, output = body.partition("\n")
                found.append(Example(where, "command", command[2:], output))
            elif lang == "python" and after is not None and after.group(1) == "text":
                between = text[block.end() : after.start()].strip()
                if between in ("", "Output:"):
                    found.append(Example(where, "python", body, after.group(2)))
    return found


def assert_same_output(got: str, want: str, where: str) -> None:
    """Equal text; numbers equal within the module's tolerance."""
    got_lines = [line.rstrip() for line in got.strip().splitlines()]
    want_lines = [line.rstrip() for line in want.strip().splitlines()]
    assert [NUMBER.sub("#", x) for x in got_lines] == [NUMBER.sub("#", x) for x in want_lines], (
        f"{where}: the output differs from the docs\n--- docs\n{want}\n--- now\n{got}"
    )
    for got_line, want_line in zip(got_lines, want_lines, strict=True):
        for a, b in zip(NUMBER.findall(got_line), NUMBER.findall(want_line), strict=True):
            assert float(a) == pytest.approx(float(b), rel=1e-4, abs=1e-5), (
                f"{where}: {a} where the docs print {b}\n{want_line}"
            )


EXAMPLES = examples()


def test_the_docs_have_examples_on_the_embedded_model() -> None:
    """The collection finds what the README and the API reference show (a change of the
    Markdown that hides them from this test fails here)."""
    kinds = sorted({(e.where.split(":")[0], e.kind) for e in EXAMPLES})
    assert ("README.md", "python") in kinds and ("README.md", "command") in kinds
    assert ("docs/api.md", "command") in kinds and ("docs/default-model.md", "python") in kinds


@pytest.fixture(scope="module")
def service_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded model served as ``make run`` serves it."""
    log = tmp_path_factory.mktemp("logs") / "docs-examples.log"
    with serve(EMBEDDED, log) as url:
        yield url


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_example_prints_what_the_docs_show(
    example: Example, service_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEPASS_BASE_URL", service_url)
    monkeypatch.chdir(REPO)
    if example.kind == "python":
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(example.code, example.where, "exec"), {"__name__": "__docs__"})
        got = out.getvalue()
    else:
        args = shlex.split(example.code)
        depass = Path(sys.executable).parent / "depass"
        done = subprocess.run(
            [str(depass), *args[1:]],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "DEPASS_BASE_URL": service_url, "NO_COLOR": "1"},
        )
        assert done.returncode == 0, done.stderr
        got = done.stdout
    assert_same_output(got, example.output, example.where)
