"""Matplotlib figures of attributions (the optional ``plot`` extra).

``pip install 'depass-client[plot]'``. Each helper returns the :class:`matplotlib.figure.Figure`
(draw on your own axes with ``ax=``); save it with ``fig.savefig("out.png")``. The colour
scale is matplotlib's ``RdBu_r``, symmetric around zero: red raises the target's logit,
blue lowers it (the scale of the HTML views and of the service's viewer).

* :func:`token_heatmap`: the input tokens coloured by their score, wrapped in rows;
* :func:`head_map`: layer x head grid of a head result over several layers;
* :func:`top_components`: the components with the largest |score|, as bars.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from depass_client._types import Attribution

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CMAP = "RdBu_r"


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "the plot helpers need matplotlib: pip install 'depass-client[plot]'"
        ) from None
    return plt


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig, new = _pyplot().subplots(figsize=size, layout="constrained")
    return fig, new


def _title(result: Attribution, position: int, target: int) -> str:
    pos = result.positions[position]
    return (
        f"target {json.dumps(result.target_tokens[target])} after position {pos} "
        f"{json.dumps(result.tokens[pos])}"
    )


def _limit(values: np.ndarray) -> float:
    largest = float(np.abs(values).max()) if values.size else 0.0
    return largest or 1.0


def token_heatmap(
    result: Attribution,
    position: int = -1,
    target: int = 0,
    layer: int = -1,
    per_row: int = 12,
    ax: Axes | None = None,
) -> Figure:
    """The input tokens as cells coloured by their score, ``per_row`` to a row.

    ``result`` is a token run without groups; ``position``, ``target``, ``layer`` are
    indices as in :meth:`Attribution.top_components`.
    """
    if result.granularity != "token" or len(result.components) != len(result.tokens):
        raise ValueError("token_heatmap needs a token result without groups")
    scores = result.score_row(position, target, layer)  # (N,)
    n = len(scores)
    rows = -(-n // per_row)
    grid = np.full((rows, per_row), np.nan)
    grid.flat[:n] = scores
    fig, ax = _axes(ax, (min(1.1 * per_row, 14), 0.7 * rows + 1.4))
    limit = _limit(scores)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=CMAP, vmin=-limit, vmax=limit, aspect="auto")
    for i, token in enumerate(result.tokens):
        r, c = divmod(i, per_row)
        strong = abs(scores[i]) / limit > 0.6
        ax.text(
            c,
            r,
            token.strip() or repr(token),
            ha="center",
            va="center",
            fontsize=9,
            color="white" if strong else "black",
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(_title(result, position, target), fontsize=10)
    fig.colorbar(image, ax=ax, label="score", shrink=0.8)
    return fig


def head_map(
    result: Attribution, position: int = -1, target: int = 0, ax: Axes | None = None
) -> Figure:
    """Layer x head grid of a head result (``granularity="head"``); one row per layer of
    ``result.layers``, or a single row for a one-layer run."""
    if result.granularity != "head" or result.scores is None:
        raise ValueError("head_map needs a head result with scores")
    scores = result.scores if result.layers is not None else result.scores[None]
    grid = np.asarray(scores[:, position, 1:, target], dtype=np.float64)  # (L, H); 0: rest
    layers = result.layers if result.layers is not None else ["?"]
    fig, ax = _axes(ax, (max(4.0, 0.6 * grid.shape[1] + 2), max(2.5, 0.45 * grid.shape[0] + 1.5)))
    limit = _limit(grid)
    image = ax.imshow(grid, cmap=CMAP, vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [f"H{h}" for h in range(grid.shape[1])])
    ax.set_yticks(range(grid.shape[0]), [f"L{layer}" for layer in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(_title(result, position, target), fontsize=10)
    fig.colorbar(image, ax=ax, label="score")
    return fig


def top_components(
    result: Attribution,
    k: int = 10,
    position: int = -1,
    target: int = 0,
    layer: int = -1,
    ax: Axes | None = None,
) -> Figure:
    """The ``k`` components with the largest |score|, largest at the top."""
    row = result.score_row(position, target, layer)  # (M,)
    order = np.argsort(-np.abs(row), kind="stable")[:k]
    values = row[order][::-1]
    labels = [result.components[i] for i in order][::-1]
    fig, ax = _axes(ax, (7.0, 0.35 * len(order) + 1.2))
    limit = _limit(values)
    colours = _pyplot().get_cmap(CMAP)((values / limit + 1) / 2)
    ax.barh(range(len(values)), values, color=colours, edgecolor="#59636e", linewidth=0.5)
    ax.set_yticks(range(len(values)), labels, fontsize=9)
    ax.axvline(0, color="#1f2328", linewidth=0.8)
    ax.set_xlabel("score")
    ax.set_title(_title(result, position, target), fontsize=10)
    return fig
