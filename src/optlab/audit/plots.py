"""PNG plots of the audits (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def _figure(width: float, height: float):  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _png(fig) -> bytes:  # type: ignore[no-untyped-def]
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def heatmap(matrix: np.ndarray, labels: Sequence[str], title: str) -> bytes:
    """A symmetric matrix in [-1, 1] with its values written in the cells."""
    fig, ax = _figure(5, 4.3)
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    for i, j in np.ndindex(matrix.shape):
        if np.isfinite(matrix[i, j]):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    return _png(fig)


def bars(
    labels: Sequence[str],
    values: Sequence[float],
    title: str,
    ylabel: str,
    errors: Sequence[tuple[float, float]] | None = None,
) -> bytes:
    """Vertical bars, value above each; optional asymmetric (low, high) error bars."""
    fig, ax = _figure(max(4.0, 0.9 * len(labels) + 1.5), 3.6)
    heights = np.nan_to_num(np.asarray(values, dtype=float))
    yerr = None
    if errors is not None:
        yerr = np.abs(np.asarray(errors, dtype=float).T - heights)
    ax.bar(range(len(labels)), heights, yerr=yerr, capsize=4,
           color=["#4c72b0" if v >= 0 else "#c44e52" for v in heights])  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    for x, v in enumerate(heights):
        ax.text(x, v, f"{v:.3g}", ha="center", va="bottom" if v >= 0 else "top", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _png(fig)


def grouped_bars(
    groups: Sequence[str], series: dict[str, Sequence[float]], title: str, ylabel: str
) -> bytes:
    """Bars per group, one colour per series (e.g. framings x models)."""
    fig, ax = _figure(max(5.0, 1.2 * len(groups) + 2), 3.8)
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = np.arange(len(groups)) + (k - (len(series) - 1) / 2) * width
        ax.bar(xs, np.nan_to_num(np.asarray(values, dtype=float)), width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)
