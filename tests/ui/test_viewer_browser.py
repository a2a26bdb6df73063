"""The web viewer (``/ui``) in a real headless Chromium against the real service.

Each test opens the page in a fresh browser context (a new tab session, so the API key is
asked again), answers the key prompt, and drives the page as a person would: typing,
clicking, hovering and exporting. Screenshots of every view are saved as artefacts.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ui.conftest import API_KEY, MAX_INPUT_TOKENS, NAME_MOVER

TIMEOUT_MS = 30_000


def api(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    """The same call the page makes, straight to the service."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.post(f"{url}/v1/{path}", json=body, headers=headers, timeout=60)


@pytest.fixture
def page(browser: Any, viewer_url: str) -> Iterator[Any]:
    """The viewer in a new tab session, the key not yet given."""
    context = browser.new_context(viewport={"width": 1100, "height": 800}, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    # anything the page tried to load from elsewhere, or to run inline, is refused and logged
    tab.on(
        "console",
        lambda message: (
            errors.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    tab.goto(f"{viewer_url}/ui")
    yield tab
    context.close()
    assert not errors, f"the page raised: {errors}"


def unlock(page: Any) -> None:
    """Answer the key prompt and wait for the first view (the tokens view)."""
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#api-key", API_KEY)
    page.click("#key-submit")
    page.wait_for_selector("#view-tokens[data-ready=true]")


def run_prompt(page: Any, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.evaluate("document.getElementById('view-tokens').removeAttribute('data-ready')")
    page.click("#run")
    page.wait_for_selector("#view-tokens[data-ready=true]")


def whiteness_distance(fill: str) -> float:
    """How far a fill colour is from white: the strength of its colour."""
    r, g, b = (int(v) for v in re.findall(r"\d+", fill)[:3])
    return ((255 - r) ** 2 + (255 - g) ** 2 + (255 - b) ** 2) ** 0.5


def test_the_key_is_asked_once_and_checked_by_the_service(page: Any, artifacts: Path) -> None:
    page.wait_for_selector("#key-form:not([hidden])")
    assert page.is_hidden("#main")
    page.fill("#api-key", "not-the-key")
    page.click("#key-submit")
    page.wait_for_selector("#key-error:not(:empty)")
    assert page.text_content("#key-error") == "the API key is not valid"
    assert page.is_visible("#key-form") and page.is_hidden("#main")
    page.screenshot(path=str(artifacts / "key-prompt.png"))
    page.fill("#api-key", API_KEY)
    page.click("#key-submit")
    page.wait_for_selector("#view-tokens[data-ready=true]")
    card = page.text_content("#model-card")
    assert "depass-tiny" in card and "layers 4" in card and "heads 4" in card
    assert f"max input {MAX_INPUT_TOKENS} tokens" in card
    page.reload()  # the same tab session: not asked again
    page.wait_for_selector("#view-tokens[data-ready=true]")
    assert page.is_hidden("#key-form")


def test_tokens_view_colours_mary_most(page: Any, viewer_url: str, artifacts: Path) -> None:
    unlock(page)
    run_prompt(page, NAME_MOVER)
    tokens = page.eval_on_selector_all(
        "#view-tokens g.token",
        "gs => gs.map(g => ({token: g.dataset.token, score: Number(g.dataset.score),"
        " fill: g.querySelector('rect').getAttribute('fill')}))",
    )
    expected = api(
        viewer_url,
        "attributions",
        {"prompt": NAME_MOVER, "positions": [-1], "array_encoding": "list"},
    ).json()
    assert [t["token"] for t in tokens] == expected["tokens"]
    strongest = max(tokens, key=lambda t: whiteness_distance(t["fill"]))
    assert strongest["token"] == "Mary"
    scores = [row[0] for row in expected["scores"]["data"][0]]
    assert [t["score"] for t in tokens] == pytest.approx(scores, abs=1e-6)
    # the picker: the model's top-5 next tokens (Mary first) and a free token
    options = page.eval_on_selector_all("#target option", "os => os.map(o => o.textContent)")
    assert len(options) == 6 and options[0].startswith('"Mary"') and "another" in options[-1]
    # hover: the exact score and its share
    page.hover("#view-tokens g.token[data-token='Mary']")
    tip = page.text_content("#tooltip")
    mary = scores[2]
    total = sum(abs(s) for s in scores) + abs(expected["remainder_scores"]["data"][0][0])
    assert f"score {mary:.6f}" in tip and f"share {100 * mary / total:.1f} %" in tip
    figure = page.text_content("#view-tokens svg")
    assert "remainder" in figure and "conservation error" in figure
    page.screenshot(path=str(artifacts / "tokens.png"), full_page=True)
    page.locator("#view-tokens").screenshot(path=str(artifacts / "view-tokens.png"))


def test_any_position_and_target_can_be_chosen(page: Any, viewer_url: str) -> None:
    unlock(page)
    page.evaluate("document.getElementById('view-tokens').removeAttribute('data-ready')")
    page.click("#positions button[data-position='4']")  # after "When Mary and John"
    page.wait_for_selector("#view-tokens[data-ready=true]")
    assert 'after position 4 "John"' in page.text_content("#view-tokens svg")
    faint = page.eval_on_selector_all(
        "#view-tokens g.token", "gs => gs.map(g => g.getAttribute('opacity'))"
    )
    assert faint[:5] == ["1"] * 5 and set(faint[5:]) == {"0.45"}
    top = api(viewer_url, "next_tokens", {"prompt": NAME_MOVER, "positions": [4]}).json()
    second = top["predictions"][0][1]
    page.evaluate("document.getElementById('view-tokens').removeAttribute('data-ready')")
    page.select_option("#target", str(second["id"]))
    page.wait_for_selector("#view-tokens[data-ready=true]")
    assert f"target {json.dumps(second['token'])} (id {second['id']})" in page.text_content(
        "#view-tokens svg"
    )
    # the other views follow the chosen position and target
    page.click(".tabs button[data-view='heads']")
    page.wait_for_selector("#view-heads[data-ready=true]")
    heads_title = page.text_content("#view-heads svg text")
    assert f"{json.dumps(second['token'])} (id {second['id']}) at position 4" in heads_title


def test_heads_view_has_layers_x_heads_cells(page: Any, viewer_url: str, artifacts: Path) -> None:
    unlock(page)
    sent: list[str] = []
    page.on(
        "request",
        lambda request: (
            sent.append(request.post_data or "")
            if request.url.endswith("/v1/attributions")
            else None
        ),
    )
    page.click(".tabs button[data-view='heads']")
    page.wait_for_selector("#view-heads[data-ready=true]")
    cells = page.eval_on_selector_all(
        "#view-heads rect.cell",
        "cs => cs.map(c => [Number(c.dataset.layer), Number(c.dataset.head),"
        " Number(c.dataset.score)])",
    )
    grid = [(layer, head) for layer in range(4) for head in range(4)]
    assert sorted((layer, head) for layer, head, _ in cells) == grid
    assert len(sent) == 1  # one all-layers head request
    body = json.loads(sent[0])
    assert body["granularity"] == "head" and body["start_layer"] == [0, 1, 2, 3]
    expected = api(viewer_url, "attributions", {**body, "array_encoding": "list"}).json()
    scores = expected["scores"]["data"]  # (L, N, H + 1, 1)
    last = len(expected["tokens"]) - 1
    for layer, head, score in cells:
        assert score == pytest.approx(scores[layer][last][head + 1][0], abs=1e-6)
    page.click("#view-heads rect.cell[data-layer='0'][data-head='1']")
    page.wait_for_selector("#view-heads g.head-detail[data-layer='0'][data-head='1']")
    detail = page.eval_on_selector_all(
        "#view-heads g.head-detail g.token", "gs => gs.map(g => Number(g.dataset.score))"
    )
    assert detail == pytest.approx([scores[0][q][2][0] for q in range(last + 1)], abs=1e-6)
    assert len(sent) == 1  # the click reuses the answer
    page.locator("#view-heads").screenshot(path=str(artifacts / "view-heads.png"))


def test_neurons_and_generation_views(page: Any, artifacts: Path) -> None:
    unlock(page)
    page.click(".tabs button[data-view='neurons']")
    page.wait_for_selector("#view-neurons[data-ready=true]")
    bars = page.eval_on_selector_all(
        "#view-neurons rect.bar", "bs => bs.map(b => Number(b.dataset.score))"
    )
    assert len(bars) == 10
    assert [abs(b) for b in bars] == sorted((abs(b) for b in bars), reverse=True)
    page.locator("#view-neurons").screenshot(path=str(artifacts / "view-neurons.png"))
    page.click(".tabs button[data-view='generation']")
    page.wait_for_selector("#view-generation[data-ready=true]")
    rows = page.eval_on_selector_all(
        "#view-generation g.generated", "gs => gs.map(g => g.querySelectorAll('rect').length)"
    )
    prompt_tokens = 15
    assert len(rows) >= 1 and rows == [prompt_tokens + i for i in range(len(rows))]
    assert page.text_content("#view-generation g.generated text") == "Mary"
    page.locator("#view-generation").screenshot(path=str(artifacts / "view-generation.png"))


def test_neurons_view_ranks_every_neuron_of_the_model(page: Any) -> None:
    """'all' layers: one reverse-mode request; the bars are the model's top neurons over
    every layer, by |score|, as the engine ranks them."""
    from engine import AttributionRequest, DePassEngine
    from tests.ui.conftest import MODEL

    unlock(page)
    page.click(".tabs button[data-view='neurons']")
    page.wait_for_selector("#view-neurons[data-ready=true]")
    with page.expect_response(lambda r: r.url.endswith("/v1/attributions")) as answered:
        page.select_option("#neuron-layer", "all")
    body = answered.value.request.post_data_json
    answer = answered.value.json()
    assert body["start_layer"] == list(range(len(body["start_layer"]))) and body["top_k"] == 10
    assert answer["strategy"] == "reverse"
    page.wait_for_selector("#view-neurons[data-ready=true]")
    labels = page.eval_on_selector_all(
        "#view-neurons rect.bar", "bs => bs.map(b => b.dataset.label)"
    )
    engine = DePassEngine.from_pretrained(str(MODEL))
    layers = list(range(engine.info.num_layers))
    every = engine.attribute(
        AttributionRequest(
            input_ids=answer["input_ids"],
            granularity="neuron",
            start_layer=layers,
            mlp_split="taylor",
            positions=answer["positions"],
            targets=answer["targets"],
        )
    )
    assert every.scores is not None and every.layer_components is not None
    ranked = sorted(
        (
            (abs(float(every.scores[li, 0, i, 0])), every.layer_components[li][i])
            for li in range(len(layers))
            for i in range(1, every.scores.shape[2])
        ),
        reverse=True,
    )
    assert labels == [label for _, label in ranked[:10]]


def test_invalid_input_shows_the_services_message(page: Any, viewer_url: str) -> None:
    unlock(page)
    page.select_option("#target", "free")
    page.fill("#free-target", "Mary John")
    page.press("#free-target", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    refused = api(
        viewer_url,
        "attributions",
        {"prompt": NAME_MOVER, "positions": [-1], "targets": ["Mary John"]},
    )
    assert refused.status_code == 422
    message = refused.json()["error"]["message"]
    assert page.text_content("#error") == f"{message} (field: targets)"


def test_a_prompt_over_the_limit_is_refused_before_sending(page: Any) -> None:
    unlock(page)
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url))
    page.fill("#prompt", "the store " * 40)  # 81 tokens with <s>
    page.wait_for_selector("#limit:not(:empty)")
    assert page.text_content("#limit") == (
        f"The prompt is 81 tokens, over this service's limit of {MAX_INPUT_TOKENS} tokens. "
        "Shorten it."
    )
    assert page.is_disabled("#run")
    assert not [url for url in sent if url.endswith(("/attributions", "/next_tokens"))]


def test_export_png_svg_and_json(page: Any, artifacts: Path) -> None:
    unlock(page)
    files = {}
    for kind in ("svg", "png", "json"):
        with page.expect_download() as download:
            page.click(f"#export-{kind}")
        path = artifacts / download.value.suggested_filename
        download.value.save_as(path)
        files[kind] = path.read_bytes()
    assert files["svg"].startswith(b"<svg") and b"Mary" in files["svg"]
    assert files["png"].startswith(b"\x89PNG\r\n\x1a\n") and len(files["png"]) > 5000
    width, height = struct.unpack(">II", files["png"][16:24])  # the IHDR chunk
    svg_size = page.eval_on_selector(
        "#view-tokens svg",
        "s => [Number(s.getAttribute('width')), Number(s.getAttribute('height'))]",
    )
    assert [width, height] == [2 * svg_size[0], 2 * svg_size[1]]  # drawn at twice the size
    exported = json.loads(files["json"])
    exchange = exported["exchanges"][0]
    assert exchange["endpoint"] == "POST /v1/attributions"
    assert exchange["request"]["granularity"] == "token"
    assert exchange["response"]["target_tokens"] == ["Mary"]


def test_a_new_prompt_takes_down_the_old_error_and_figure(page: Any) -> None:
    """Clearing the prompt after an error left the error box and the previous prompt's
    figure on screen (issue 22)."""
    unlock(page)
    assert page.eval_on_selector_all("#view-tokens g.token", "gs => gs.length") > 0
    page.select_option("#target", "free")
    page.fill("#free-target", "Mary John")
    page.press("#free-target", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    page.fill("#prompt", "")
    page.wait_for_selector("#error", state="hidden")
    page.wait_for_selector("#limit:not(:empty)")
    assert page.text_content("#limit") == "Type a prompt."
    assert page.eval_on_selector_all("#view-tokens g.token", "gs => gs.length") == 0
    assert page.get_attribute("#view-tokens", "data-ready") is None


def test_byte_pieces_of_a_character_join_for_display(page: Any) -> None:
    """Tokens shown as bytes (byte-level BPE on CJK and emoji) join into the characters
    they spell, in the page's own module, in Chromium."""
    unlock(page)
    tokens = ["<s>", " I", " <0xE4><0xBD>", "<0xA0>", " <0xF0><0x9F>", "<0x8E>", "<0x89>", "<0xFF>"]
    joined = page.evaluate("async (tokens) => (await import('./svg.js')).pieces(tokens)", tokens)
    assert [(p["first"], p["last"], p["text"]) for p in joined] == [
        (0, 0, "<s>"),
        (1, 1, " I"),
        (2, 3, " 你"),
        (4, 6, " 🎉"),
        (7, 7, "<0xFF>"),
    ]
