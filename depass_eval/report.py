"""Writing results: the JSON of every number, Markdown tables and matplotlib plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Per curve of the tokens protocol, whether a higher AUC is the better one: patch-top
#: (restoring the top tokens brings the answer back) yes, recover-top (removing them) no.
HIGHER_IS_BETTER = {"patch": True, "recover": False}


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def sem(values: Sequence[float]) -> float:
    """Standard error of the mean (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def best_first(methods: Mapping[str, Any], names: Sequence[str], mode: str) -> list[str]:
    """``names`` from the best AUC on curve ``mode`` to the worst (equal AUCs keep their
    order), read from ``methods`` (a results' ``methods``)."""
    return sorted(names, key=lambda m: methods[m][mode]["auc"], reverse=HIGHER_IS_BETTER[mode])


def verdict(result: dict[str, Any], mode: str, ours: str, theirs: str) -> str:
    """Whether DePass's method ``ours`` ``wins``, ``loses`` or ``ties`` against ``theirs``
    on one curve (patch-top: higher is better; recover-top: lower). A tie when the two
    AUCs differ by less than twice the standard error of their difference (taken as
    independent: conservative, the prompts are shared)."""
    a, b = (result["methods"][m][mode] for m in (ours, theirs))
    gap = a["auc"] - b["auc"]
    if abs(gap) < 2 * math.hypot(a.get("auc_sem", 0.0), b.get("auc_sem", 0.0)):
        return "ties"
    better = gap > 0 if HIGHER_IS_BETTER[mode] else gap < 0
    return "wins" if better else "loses"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats get 3 decimals, right-aligned numeric columns."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if np.isnan(value) else f"{value:.3f}"
        return str(value)

    numeric = [
        all(isinstance(row[i], (int, float)) for row in rows) if rows else False
        for i in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, summary: dict[str, Any], markdown: str) -> None:
    """``results.json`` and ``summary.md``."""
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (out_dir / "summary.md").write_text(markdown.rstrip() + "\n", encoding="utf-8")


def line_plot(
    path: Path,
    panels: Sequence[tuple[str, str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]],
    xlabel: str,
    title: str,
    highlight: str = "depass",
) -> None:
    """One row of panels ``(panel title, y label, {method: (x, y)})``; methods whose name
    starts with ``highlight`` are drawn solid and thick, the others dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (panel, ylabel, series) in zip(axes[0], panels, strict=True):
        for index, (method, (x, y)) in enumerate(series.items()):
            ours = method.startswith(highlight)
            ax.plot(
                x,
                y,
                color=plt.cm.tab20((2 * index + index // 10) % 20),  # 10 hues, then light
                marker="o",
                markersize=3,
                linewidth=2.2 if ours else 1.2,
                linestyle="-" if ours else "--",
                label=method,
            )
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
