"""``curves.png``: success, return and invalid-action rate against environment steps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (
    ("success rate", "success_rate", "val_success_rate"),
    ("mean return", "mean_return", "val_mean_return"),
    ("invalid-action rate", "invalid_action_rate", None),
)


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Plot training (line) and validation (markers) records of ``history`` to ``path``.

    Args:
        history: metric records, each with ``env_steps`` and any of the plotted keys.
        path: the PNG file to write.
    """
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (title, train_key, val_key) in zip(axes, PANELS, strict=True):
        for key, style, label in ((train_key, "-", "train"), (val_key, "o--", "validation")):
            points = [(r["env_steps"], r[key]) for r in history if key and key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, label=label)
        if title.endswith("rate"):
            ax.set_ylim(-0.05, 1.05)  # rates: the whole range, so a flat line reads as such
        ax.set_title(title)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # the invalid-action panel has no validation
            ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
