"""PNG plots for runs and reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mass_exp.utils.io import atomic_path


def _pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str | Path, dpi: int) -> Path:
    """Lay out, write atomically (temporary file, then rename) and close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def plot_confusion(matrix: Sequence[Sequence[int]], names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Router task confusion matrix: rows = true task, columns = routed task (argmax p), row-normalised."""
    import numpy as np

    plt = _pyplot()

    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("routed task (argmax p)")
    ax.set_ylabel("true task")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "router confusion (%)")
    return _save_png(fig, path, dpi=120)


def plot_per_task(values: dict[str, dict[str, float | None]], tasks: Sequence[str], path: str | Path,
                  title: str = "", ylabel: str = "normalized accuracy (%)") -> Path:
    """Grouped bar chart: one group per task, one bar per method (row label); missing values are left out."""
    import numpy as np

    plt = _pyplot()

    labels = list(values)
    n = max(len(labels), 1)
    width = 0.8 / n
    x = np.arange(len(tasks))
    width_in = min(24.0, max(7.0, 0.12 * n * len(tasks) + 4.0))
    fig, ax = plt.subplots(figsize=(width_in, max(4.8, 0.17 * n + 1.0)))
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    for i, label in enumerate(labels):
        ys = np.array([np.nan if values[label].get(t) is None else values[label][t] for t in tasks], dtype=float)
        ax.bar(x - 0.4 + (i + 0.5) * width, ys, width, label=label, color=cmap(i % cmap.N),
               hatch="//" if i >= cmap.N else None)
    ax.set_xticks(x, tasks, rotation=45 if len(tasks) > 8 else 0, ha="right" if len(tasks) > 8 else "center")
    ax.set_ylabel(ylabel)
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save_png(fig, path, dpi=110)
