"""Self-contained HTML views of attributions, for notebooks and files.

``Attribution._repr_html_`` (Jupyter) and ``Attribution.to_html()`` render through here:
plain HTML with inline styles and no JavaScript at all, so a saved page or a notebook
shows the same thing offline. Token results become a heat map of the input tokens; head
results over several layers a layer x head grid; any other result a ranked table. Hover
text (``title``) carries each exact score and its share.

Colours are ColorBrewer's RdBu, the scale of the service's viewer (``/ui``) and of
matplotlib's ``RdBu_r`` in :mod:`depass_client.plots`: red raises the target's logit, blue
lowers it, white is zero, and the scale runs from -max|score| to +max|score|.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Attribution(Protocol):
    """What the views read of an attribution (:class:`depass_client.Attribution`); a
    protocol, so that the result type imports the views and not the reverse."""

    tokens: list[str]
    components: list[str]
    positions: list[int]
    targets: list[int]
    target_tokens: list[str]
    granularity: str
    layers: list[int] | None
    conservation_error: float
    relative_conservation_error: float
    model: str
    scores: np.ndarray | None
    remainder_scores: np.ndarray | None
    logits: np.ndarray | None

    def score_row(self, position: int = -1, target: int = 0, layer: int = -1) -> np.ndarray: ...


_POSITIVE = ("#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f")
_NEGATIVE = ("#f7f7f7", "#d1e5f0", "#92c5de", "#4393c3", "#2166ac", "#053061")

_STYLE = (
    "font-family:'DejaVu Sans Mono',ui-monospace,monospace;font-size:13px;color:#1f2328;"
    "line-height:1.9"
)
_CHIP = "display:inline-block;padding:0 5px;margin:1px;border:1px solid #d0d7de;border-radius:3px"


def colour(score: float, limit: float) -> str:
    """``rgb(r, g, b)`` of ``score`` on the diverging scale from ``-limit`` to ``+limit``."""
    stops = _NEGATIVE if score < 0 else _POSITIVE
    t = min(1.0, abs(score) / limit) if limit > 0 else 0.0
    x = t * (len(stops) - 1)
    i = min(len(stops) - 2, int(x))
    a, b = _rgb(stops[i]), _rgb(stops[i + 1])
    f = x - i
    r, g, bl = (round(u + (v - u) * f) for u, v in zip(a, b, strict=True))
    return f"rgb({r}, {g}, {bl})"


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    n = int(hex_colour[1:], 16)
    return (n >> 16) & 255, (n >> 8) & 255, n & 255


def shares(values: Sequence[float]) -> list[float]:
    """Each value's signed share of the total absolute credit (all of ``values``)."""
    total = float(sum(abs(v) for v in values))
    return [float(v) / total if total > 0 else 0.0 for v in values]


def _ink(score: float, limit: float) -> str:
    return "#ffffff" if limit > 0 and abs(score) / limit > 0.6 else "#1f2328"


def _shown(token: str) -> str:
    return token.replace(" ", "\u00b7").replace("\n", "\u21b5") or "\u2205"


def _chip(label: str, score: float, limit: float, title: str, extra: str = "") -> str:
    style = f"{_CHIP};background:{colour(score, limit)};color:{_ink(score, limit)}{extra}"
    return (
        f'<span class="depass-token" data-score="{score!r}" style="{style}" '
        f'title="{html.escape(title)}">{html.escape(_shown(label))}</span>'
    )


def _legend(limit: float) -> str:
    stops = ", ".join(colour(-limit + 2 * limit * k / 10, limit) for k in range(11))
    bar = (
        "display:inline-block;width:180px;height:10px;vertical-align:middle;"
        f"border:1px solid #d0d7de;background:linear-gradient(to right, {stops})"
    )
    return (
        f'<div style="font-size:11px;color:#59636e">{-limit:.3f} <span style="{bar}"></span> '
        f"+{limit:.3f} &nbsp;(red raises the logit, blue lowers it)</div>"
    )


def _is_token_result(result: Attribution) -> bool:
    """Whether each component is one input token (token runs without groups)."""
    return result.granularity == "token" and len(result.components) == len(result.tokens)


def attribution_html(
    result: Attribution, position: int = -1, target: int = 0, layer: int = -1
) -> str:
    """The result as an HTML fragment (a ``<div>``): a token heat map, a layer x head grid,
    or a ranked table (``position``, ``target``, ``layer``: indices as in ``top_components``)."""
    if result.scores is None:
        return f'<div style="{_STYLE}">{html.escape(repr(result))}</div>'
    pos = result.positions[position]
    title = (
        f"target {json.dumps(result.target_tokens[target])} (id {result.targets[target]}) "
        f"after position {pos} {json.dumps(result.tokens[pos])}, model {result.model or '?'}, "
        f"granularity {result.granularity}"
    )
    if _is_token_result(result):
        body = _token_map(result, position, target, layer, pos)
    elif result.granularity == "head" and result.layers is not None:
        body = _head_grid(result, position, target)
    else:
        body = _ranked(result, position, target, layer)
    footer = _numbers(result, position, target, layer)
    return (
        f'<div class="depass-attribution" style="{_STYLE}">'
        f"<div><b>{html.escape(title)}</b></div>{body}{footer}</div>"
    )


def attribution_page(
    result: Attribution, position: int = -1, target: int = 0, layer: int = -1
) -> str:
    """A whole HTML document around :func:`attribution_html` (for ``--html out.html``)."""
    fragment = attribution_html(result, position, target, layer)
    name = html.escape(f"DePass attribution: {result.model or 'model'}")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<title>{name}</title></head><body style="margin:16px">{fragment}</body></html>\n'
    )


def _numbers(result: Attribution, position: int, target: int, layer: int) -> str:
    parts = []
    if result.logits is not None:
        logits = result.logits if result.layers is None else result.logits[layer]
        parts.append(f"logit {float(logits[position, target]):.4f}")
    if result.remainder_scores is not None:
        rem = result.remainder_scores if result.layers is None else result.remainder_scores[layer]
        parts.append(f"remainder {float(rem[position, target]):.4f}")
    parts.append(
        f"conservation error {result.conservation_error:.2e} "
        f"(relative {result.relative_conservation_error:.2e})"
    )
    return f'<div style="color:#59636e;font-size:12px">{html.escape(", ".join(parts))}</div>'


def _token_map(result: Attribution, position: int, target: int, layer: int, pos: int) -> str:
    row = result.score_row(position, target, layer)  # (N,)
    limit = float(np.abs(row).max()) if row.size else 0.0
    rem = 0.0
    if result.remainder_scores is not None:
        rems = result.remainder_scores if result.layers is None else result.remainder_scores[layer]
        rem = float(rems[position, target])
    share = shares([*row.tolist(), rem])
    chips = []
    for first, last, text in pieces(result.tokens):  # byte pieces of a character: one chip
        score = float(row[first : last + 1].sum())
        names = "\n".join(result.components[first : last + 1])
        hover = f"{names}\nscore {score:.6f}\nshare {100 * sum(share[first : last + 1]):.1f} %"
        extra = ";border:2px solid #1f2328" if first <= pos <= last else ""
        extra += ";opacity:0.45" if first > pos else ""
        chips.append(_chip(text, score, limit, hover, extra))
    return f"<div>{''.join(chips)}</div>{_legend(limit)}"


_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_of(token: str) -> bytes:
    """The bytes a token text stands for: its text in UTF-8, ``<0xE4>`` as its byte."""
    out, last = bytearray(), 0
    for match in _BYTE.finditer(token):
        out += token[last : match.start()].encode() + bytes([int(match.group(1), 16)])
        last = match.end()
    return bytes(out + token[last:].encode())


def pieces(tokens: list[str]) -> list[tuple[int, int, str]]:
    """The tokens as display pieces ``(first, last, text)``: a token shown as bytes
    (``<0xE4><0xBD>``, part of a UTF-8 character) is joined with the tokens after it until
    the bytes make whole characters; every other token is a piece of its own (the
    viewer's ``pieces`` in ``service/static/ui/svg.js`` does the same)."""
    out: list[tuple[int, int, str]] = []
    i = 0
    while i < len(tokens):
        if not _BYTE.search(tokens[i]):
            out.append((i, i, tokens[i]))
            i += 1
            continue
        j, raw, text = i, _bytes_of(tokens[i]), None
        while True:
            try:
                text = raw.decode("utf-8")
                break
            except UnicodeDecodeError:
                if j + 1 >= len(tokens) or not _BYTE.search(tokens[j + 1]):
                    break
                j += 1
                raw += _bytes_of(tokens[j])
        out.append((i, j, text if text is not None else "".join(tokens[i : j + 1])))
        i = j + 1
    return out


def _head_grid(result: Attribution, position: int, target: int) -> str:
    """Layers x heads from a head result over several layers (component 0 is ``rest``)."""
    assert result.scores is not None and result.layers is not None
    grid = np.asarray(result.scores[:, position, 1:, target], dtype=np.float64)  # (L, H)
    limit = float(np.abs(grid).max()) if grid.size else 0.0
    share = shares(grid.ravel().tolist())
    cell = "width:38px;height:20px;border:1px solid #fff"
    heads = "".join(f'<th style="font-weight:400">H{h}</th>' for h in range(grid.shape[1]))
    rows = []
    for r, layer in enumerate(result.layers):
        cells = []
        for h, score in enumerate(grid[r]):
            s = float(score)
            hover = (
                f"L{layer}.H{h}\nscore {s:.6f}\nshare {100 * share[r * grid.shape[1] + h]:.1f} %"
            )
            cells.append(
                f'<td class="depass-cell" data-score="{s!r}" title="{html.escape(hover)}" '
                f'style="{cell};background:{colour(s, limit)}"></td>'
            )
        rows.append(f'<tr><th style="font-weight:400">L{layer}</th>{"".join(cells)}</tr>')
    table = (
        f'<table style="border-collapse:collapse"><tr><th></th>{heads}</tr>{"".join(rows)}</table>'
    )
    return table + _legend(limit)


def _ranked(result: Attribution, position: int, target: int, layer: int, k: int = 12) -> str:
    """The components with the largest |score|, with bars."""
    row = result.score_row(position, target, layer)  # (M,)
    order = np.argsort(-np.abs(row), kind="stable")[:k]
    limit = float(np.abs(row[order]).max()) if order.size else 0.0
    share = shares(row.tolist())
    lines = []
    for i in order:
        score = float(row[i])
        width = round(160 * abs(score) / limit) if limit > 0 else 0
        bar = (
            f'<span style="display:inline-block;width:{width}px;height:10px;'
            f'background:{colour(score, limit)};border:1px solid #59636e"></span>'
        )
        label = html.escape(result.components[i])
        lines.append(
            f'<tr class="depass-row" data-score="{score!r}" '
            f'title="share {100 * share[i]:.1f} %"><td>{label}</td>'
            f'<td style="text-align:right;padding:0 8px">{score:.4f}</td><td>{bar}</td></tr>'
        )
    return f'<table style="border-collapse:collapse">{"".join(lines)}</table>'
