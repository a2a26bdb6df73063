"""The ``depass`` command line against the real service."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def test_attribute_reverse_strategy_and_top_k(server: str) -> None:
    text = run(
        server,
        "attribute",
        PROMPT,
        "--granularity",
        "neuron",
        "--layer",
        "0,1",
        "--split",
        "taylor",
        "--strategy",
        "reverse",
        "--top-k",
        "3",
        "--json",
    )
    result = json.loads(text)
    assert result["strategy"] == "reverse" and result["kept_top_k"] == 3
    assert result["layers"] == [0, 1] and len(result["components"]) <= 6
    table = run(server, "attribute", PROMPT, "--split", "taylor", "--strategy", "reverse")
    assert table.splitlines()[0] == "model tiny-llama0, granularity token, strategy reverse"


def test_attribute_colours_tokens_on_a_terminal(server: str) -> None:
    text = run(server, "attribute", PROMPT, out=Terminal())
    assert "\x1b[1;38;5;" in text.splitlines()[1]
    assert "\x1b[" not in run(server, "attribute", PROMPT)  # not on a pipe


def _xterm_rgb(index: int) -> tuple[int, int, int]:
    """The RGB of a colour of the 256-colour cube (16-231)."""
    levels = (0, 95, 135, 175, 215, 255)
    index -= 16
    return levels[index // 36], levels[index // 6 % 6], levels[index % 6]


def test_red_raises_and_blue_lowers_as_in_the_viewer_and_the_plots() -> None:
    """The convention of the viewer, the HTML view and the plots (RdBu): red raises."""
    from depass_client import Attribution
    from depass_client.cli import _tokens_line

    result = Attribution(
        tokens=["up", "down"],
        input_ids=[5, 6],
        components=['tok[0]:"up"', 'tok[1]:"down"'],
        positions=[1],
        targets=[7],
        target_tokens=["x"],
        first_positions=[0, 1],
        scores=np.array([[[2.0], [-2.0]]], dtype=np.float32),
    )
    line = _tokens_line(result, colour=True)
    shades = [int(code) for code in re.findall(r"38;5;(\d+)m", line)]
    (r_up, _, b_up), (r_down, _, b_down) = (_xterm_rgb(shade) for shade in shades)
    assert r_up > b_up and b_down > r_down, shades
    assert "red raises the target's logit, blue lowers it" in line


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


def test_a_list_of_head_layers_prints_a_table_per_layer(server: str) -> None:
    text = run(server, "attribute", PROMPT, "--granularity", "head", "--layer", "0,1")
    heads = text.split("target ")[1:]
    assert len(heads) == 2 and "layer 0" in heads[0] and "layer 1" in heads[1]
    for layer, table in enumerate(heads):
        names = [line.split()[1] for line in table.splitlines()[2:] if line.split()[0].isdigit()]
        assert names and all(n == "rest" or n.startswith(f"L{layer}.H") for n in names), table


def test_version_and_help_name_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    from depass_client import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"depass {__version__}"
    with pytest.raises(SystemExit):
        main(["attribute", "--help"])
    help_text = capsys.readouterr().out
    assert (
        "DEPASS_BASE_URL" in help_text and "DEPASS_API_KEY" in help_text and "--chat" in help_text
    )


def test_chat_on_a_model_without_a_template(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["attribute", "the capital", "--chat", "--base-url", server]) == 1
    assert "no chat template" in capsys.readouterr().err
