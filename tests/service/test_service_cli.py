"""The ``depass`` command line against the real service."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from depass_client.cli import main
from tests.service.conftest import PROMPT


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(server: str, *args: str, out: io.StringIO | None = None) -> str:
    out = out if out is not None else io.StringIO()
    assert main([*args, "--base-url", server], stdout=out) == 0
    return out.getvalue()


def test_attribute_prints_a_table(server: str) -> None:
    text = run(server, "attribute", PROMPT, "--granularity", "head", "--layer", "1", "--top", "3")
    lines = text.splitlines()
    assert lines[0] == "model tiny-llama0, granularity head, layer 1"
    assert lines[1] == "tokens: <s> the capital of France is"
    assert lines[2].startswith("target ") and "at position 5 'is'" in lines[2]
    assert lines[3].split() == ["rank", "component", "score"]
    ranked = [line.split()[1] for line in lines[4:7]]
    assert len(ranked) == 3 and all(c == "rest" or c.startswith("L1.H") for c in ranked)
    assert "remainder" in lines[7] and lines[8].startswith("conservation error")


def test_attribute_colours_tokens_on_a_terminal(server: str) -> None:
    text = run(server, "attribute", PROMPT, out=Terminal())
    assert "\x1b[1;38;5;" in text.splitlines()[1]
    assert "\x1b[" not in run(server, "attribute", PROMPT)  # not on a pipe


def test_attribute_json_for_scripts(server: str) -> None:
    result = json.loads(run(server, "attribute", PROMPT, "--json", "--target", "Paris"))
    assert result["target_tokens"] == ["Paris"] and result["positions"] == [5]
    assert len(result["scores"][0]) == len(result["components"]) == 6


def test_model_tokenize_generate_health(server: str) -> None:
    assert "family  llama" in run(server, "model")
    assert json.loads(run(server, "model", "--json"))["num_layers"] == 2
    assert "6 tokens" in run(server, "tokenize", PROMPT)
    assert json.loads(run(server, "tokenize", PROMPT, "--json"))["tokens"][1] == "the"
    assert "[1]" in run(server, "generate", PROMPT, "--max-new-tokens", "2")
    assert json.loads(run(server, "health")) == {"status": "ok"}


def test_errors_exit_1_with_the_message(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["attribute", PROMPT, "--layer", "9", "--base-url", server])
    assert code == 1
    assert "422" in capsys.readouterr().err


def test_console_script_is_installed(server: str) -> None:
    script = Path(sys.executable).parent / "depass"
    assert script.exists(), "pip install -e clients/python (make install) installs `depass`"
    done = subprocess.run(
        [str(script), "--base-url", server, "health"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "ok" in done.stdout


def test_attribute_writes_a_self_contained_html_page(server: str, tmp_path: Path) -> None:
    page = tmp_path / "out.html"
    text = run(server, "attribute", PROMPT, "--html", str(page))
    assert text.startswith("model tiny-llama0")  # the table is still printed
    html = page.read_text()
    assert html.startswith("<!doctype html>") and "<script" not in html
    assert html.count('class="depass-token"') == 6  # <s> the capital of France is
    assert "conservation error" in html
