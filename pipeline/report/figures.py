"""The report's matplotlib figures (Agg, no display) and their PNG bytes."""
from __future__ import annotations

import io
from typing import Optional

LEGEND_SIZE = 9       # points: read at the page's width, where a figure is shown at about 85% of its size
LINE_STYLES = ("-", "--", ":", "-.")
INSIDE_LEGEND = 6     # students a legend may list inside its panel before it hides the curves


def png(fig, title: Optional[str] = None) -> bytes:
    """The figure as PNG; `title` (the output a figure draws, e.g. `round-2/teacher`) goes above its panels."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    return buf.getvalue()


def figure(rows: int, cols: int, width: float = 5.0, height: float = 3.2):
    """(figure, [rows][cols] axes) of panels width x height inches each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes


def training_figure(runs: list[tuple[str, list[dict]]], keys: list[str]):
    """One panel per key over the steps, each with its own legend; a student keeps its colour and line style in
    every panel (also in those where another student has no curve)."""
    from matplotlib.ticker import MaxNLocator

    cols = min(2, len(keys))
    outside = len(runs) > INSIDE_LEGEND
    fig, axes = figure((len(keys) + cols - 1) // cols, cols, width=6.0,
                       height=3.4 + (0.25 * ((len(runs) + 1) // 2) if outside else 0))
    styles = {label: {"color": f"C{i % 10}", "linestyle": LINE_STYLES[i // 10 % len(LINE_STYLES)]}
              for i, (label, _) in enumerate(runs)}
    for i, key in enumerate(keys):
        ax = axes[i // cols][i % cols]
        for label, rows in runs:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=label, **styles[label])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if outside:   # under the panel, not over its curves
            ax.legend(fontsize=LEGEND_SIZE, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
        else:
            ax.legend(fontsize=LEGEND_SIZE)
    for j in range(len(keys), axes.size):
        axes[j // cols][j % cols].axis("off")
    return fig


def rsum_figure(bars: list[tuple[str, float]]):
    """RSUM per evaluation as bars from zero (so a bar's length is its RSUM), each labelled with its value."""
    fig, axes = figure(1, 1, width=8, height=0.32 * len(bars) + 1.2)
    ax = axes[0][0]
    drawn = ax.barh(range(len(bars)), [v for _, v in bars], color="tab:blue")
    ax.bar_label(drawn, fmt="%.1f", padding=3, fontsize=LEGEND_SIZE)
    ax.set_yticks(range(len(bars)), [n for n, _ in bars], fontsize=LEGEND_SIZE)
    ax.set_xlim(0, 1.12 * max(max(v for _, v in bars), 1.0))   # room for the value labels
    ax.invert_yaxis()
    ax.set_title("RSUM per evaluation (higher is better)")
    return fig
