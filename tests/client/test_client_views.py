"""The SDK's HTML views and matplotlib plots, on results built by hand."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from depass_client import Attribution
from depass_client.views import colour, pieces, shares

REPO = Path(__file__).resolve().parents[2]
TOKENS = ["<s>", "When", "Mary", "and", "John", "gave", "to"]


def token_result(scores: list[float]) -> Attribution:
    n = len(TOKENS)
    return Attribution(
        tokens=TOKENS,
        input_ids=list(range(n)),
        components=[f'tok[{i}]:"{t}"' for i, t in enumerate(TOKENS)],
        positions=[n - 1],
        targets=[4],
        target_tokens=["Mary"],
        model="m",
        conservation_error=1e-6,
        relative_conservation_error=1e-7,
        scores=np.array(scores, np.float32).reshape(1, n, 1),
        remainder_scores=np.array([[0.5]], np.float32),
        logits=np.array([[sum(scores) + 0.5]], np.float32),
    )


def head_result(layers: int = 3, heads: int = 4) -> Attribution:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(layers, 2, heads + 1, 1)).astype(np.float32)
    scores[1, -1, 3, 0] = 9.0  # L1.H2 at the last position
    return Attribution(
        tokens=["a", "b"],
        input_ids=[0, 1],
        components=["rest"] + [f"L{layers - 1}.H{h}" for h in range(heads)],
        positions=[0, 1],
        targets=[7],
        target_tokens=["x"],
        granularity="head",
        layers=list(range(layers)),
        scores=scores,
        remainder_scores=np.zeros((layers, 2, 1), np.float32),
        logits=np.ones((layers, 2, 1), np.float32),
    )


class Elements(HTMLParser):
    """Every start tag with its attributes, and whether a script is anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def parse(text: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Elements()
    parser.feed(text)
    return parser.tags


def strength(style: str) -> float:
    r, g, b = (int(v) for v in re.search(r"background:rgb\((\d+), (\d+), (\d+)\)", style).groups())
    return ((255 - r) ** 2 + (255 - g) ** 2 + (255 - b) ** 2) ** 0.5


def test_colour_scale_is_diverging_and_centred_at_zero() -> None:
    assert colour(0.0, 2.0) == colour(0.0, 0.0) == "rgb(247, 247, 247)"
    assert colour(2.0, 2.0) == "rgb(103, 0, 31)" and colour(5.0, 2.0) == "rgb(103, 0, 31)"
    assert colour(-2.0, 2.0) == "rgb(5, 48, 97)"
    red = [int(v) for v in re.findall(r"\d+", colour(1.0, 2.0))]
    blue = [int(v) for v in re.findall(r"\d+", colour(-1.0, 2.0))]
    assert red[0] > red[2] and blue[2] > blue[0]  # red above zero, blue below
    assert shares([3.0, -1.0]) == [0.75, -0.25] and shares([0.0]) == [0.0]


def test_token_html_colours_the_strongest_token_most_and_is_self_contained() -> None:
    result = token_result([0.1, 0.2, 6.0, -0.5, 1.0, 0.0, 0.3])
    fragment = result._repr_html_()
    chips = [a for tag, a in parse(fragment) if "depass-token" in (a.get("class") or "")]
    assert len(chips) == len(TOKENS)
    strongest = max(range(len(chips)), key=lambda i: strength(chips[i]["style"] or ""))
    assert strongest == 2
    assert [float(c["data-score"] or 0) for c in chips] == pytest.approx(
        [0.1, 0.2, 6.0, -0.5, 1.0, 0.0, 0.3], abs=1e-6
    )
    # hover text: the exact score and its share of |credit| (the remainder included)
    total = 0.1 + 0.2 + 6.0 + 0.5 + 1.0 + 0.0 + 0.3 + 0.5
    assert chips[2]["title"] == f'tok[2]:"Mary"\nscore 6.000000\nshare {600 / total:.1f} %'
    assert "remainder 0.5000" in fragment and "conservation error 1.00e-06" in fragment
    page = result.to_html()
    assert page.startswith("<!doctype html>") and fragment in page
    for text in (fragment, page):
        assert "<script" not in text.lower() and "http" not in text.lower()


def test_byte_pieces_of_a_character_show_as_one_chip() -> None:
    """Tokens shown as bytes (issue 22) join into the character they spell, with the
    summed score; the hover names each token."""
    tokens = ["<s>", " I", " <0xE4><0xBD>", "<0xA0>", "!", "<0xFF>"]
    n = len(tokens)
    scores = [0.1, 0.2, 1.0, 2.0, 0.5, 0.25]
    result = Attribution(
        tokens=tokens,
        input_ids=list(range(n)),
        components=[f"tok[{i}]" for i in range(n)],
        positions=[n - 1],
        targets=[4],
        target_tokens=["x"],
        scores=np.array(scores, np.float32).reshape(1, n, 1),
    )
    chips = [a for tag, a in parse(result.to_html()) if "depass-token" in (a.get("class") or "")]
    assert [float(c["data-score"] or 0) for c in chips] == pytest.approx([0.1, 0.2, 3.0, 0.5, 0.25])
    assert chips[2]["title"].startswith("tok[2]\ntok[3]\nscore 3.000000")
    assert pieces(tokens) == [
        (0, 0, "<s>"),
        (1, 1, " I"),
        (2, 3, " 你"),
        (4, 4, "!"),
        (5, 5, "<0xFF>"),  # bytes that make no character stay as they are
    ]


def test_head_html_is_a_layer_by_head_grid() -> None:
    cells = [a for tag, a in parse(head_result()._repr_html_()) if tag == "td"]
    assert len(cells) == 3 * 4
    strongest = max(cells, key=lambda a: abs(float(a["data-score"] or 0)))
    assert strongest["title"].startswith("L1.H2\nscore 9.000000")


def test_other_results_are_a_ranked_table() -> None:
    result = token_result([0.1, 0.2, 6.0, -0.5, 1.0, 0.0, 0.3])
    result.granularity = "neuron"
    result.components = ["rest", *(f"L0.N{i}" for i in range(6))]
    rows = [a for tag, a in parse(result._repr_html_()) if tag == "tr"]
    assert [float(a["data-score"] or 0) for a in rows][:3] == pytest.approx([6.0, 1.0, -0.5])


# ---------------------------------------------------------------------------- plots


def saved(fig: object, path: Path, dpi: int = 50) -> np.ndarray:
    """Save ``fig`` as PNG; the image as read back (H, W, 4)."""
    from matplotlib.image import imread

    fig.savefig(path, dpi=dpi)  # type: ignore[attr-defined]
    assert path.is_file() and path.stat().st_size > 1000
    return imread(path)


def assert_not_blank(image: np.ndarray) -> None:
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # not one flat colour
    colourful = (rgb.max(-1) - rgb.min(-1)) > 0.3  # saturated pixels: the colour scale
    assert colourful.mean() > 0.005


def test_plots_return_figures_that_draw(tmp_path: Path) -> None:
    plots = pytest.importorskip("depass_client.plots")
    from matplotlib.figure import Figure

    result = token_result([0.1, 0.2, 6.0, -0.5, 1.0, 0.0, 0.3])
    heads = head_result()
    figures = {
        "tokens": plots.token_heatmap(result, per_row=4),
        "heads": plots.head_map(heads),
        "top": plots.top_components(result, k=5),
    }
    for name, fig in figures.items():
        assert isinstance(fig, Figure), name
        width, height = fig.get_size_inches()
        image = saved(fig, tmp_path / f"{name}.png")
        assert image.shape[:2] == (int(height * 50), int(width * 50)), name
        assert_not_blank(image)
    # the strongest token's cell is the darkest red of the heat map
    grid = figures["tokens"].axes[0].images[0].get_array()
    assert grid.shape == (2, 4) and float(grid[0, 2]) == pytest.approx(6.0)
    assert [t.get_text() for t in figures["heads"].axes[0].get_yticklabels()] == ["L0", "L1", "L2"]
    bars = figures["top"].axes[0].patches
    assert len(bars) == 5 and bars[-1].get_width() == pytest.approx(6.0)  # largest at the top


def test_plots_refuse_results_they_cannot_draw() -> None:
    plots = pytest.importorskip("depass_client.plots")
    with pytest.raises(ValueError, match="token result"):
        plots.token_heatmap(head_result())
    with pytest.raises(ValueError, match="head result"):
        plots.head_map(token_result([0.0] * 7))


def test_plots_draw_on_given_axes() -> None:
    plots = pytest.importorskip("depass_client.plots")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2)
    assert plots.top_components(token_result([1.0] * 7), ax=left) is fig
    assert plots.head_map(head_result(), ax=right) is fig
    assert left.patches and right.images


def test_html_needs_no_matplotlib_and_plots_say_how_to_get_it() -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from tests.client.test_client_views import token_result\n"
        "result = token_result([1.0] * 7)\n"
        "assert 'depass-token' in result.to_html()\n"
        "from depass_client import plots\n"
        "try:\n"
        "    plots.token_heatmap(result)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert "pip install 'depass-client[plot]'" in done.stdout
