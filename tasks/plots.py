"""The learning curve as a picture: accuracy (micro F1 for a multi-label project) and macro
F1 against the number of labels.

Drawn with matplotlib's object API on an Agg canvas (never pyplot), so that no global
backend or figure state of the caller's process is touched and it works headless.
matplotlib is imported on first use: commands that draw nothing do not pay for it.
"""

from __future__ import annotations

import io

import pandas as pd

# (cycles column, legend name, colour): one line each
METRICS = (("accuracy", "accuracy", "#1f77b4"), ("macro_f1", "macro F1", "#ff7f0e"))
# a multi-label project's cycles have no accuracy: micro F1 takes its place
TAG_METRICS = (("micro_f1", "micro F1", "#1f77b4"), ("macro_f1", "macro F1", "#ff7f0e"))


def learning_curve_figure(cycles: pd.DataFrame, metric: str | None = None, *,
                          size: tuple[float, float] = (6.0, 3.0), dpi: int = 80):
    """A matplotlib ``Figure`` of the learning curve.

    ``cycles``: one row per cycle in order (the store's ``cycles`` table), with columns
    ``n_labels`` (x, labels trained on), ``accuracy`` and ``macro_f1`` (y, in [0, 1]; NaN
    or None where a cycle has no score: left out; ``micro_f1`` in accuracy's place when
    present, a multi-label project's) and ``promoted``. One line per metric;
    cycles whose model was promoted are ringed. ``metric``, the one that decides
    promotion, is drawn thicker. ``size`` in inches at ``dpi`` pixels per inch.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not len(cycles):
        raise ValueError("no cycle recorded yet: nothing to plot")
    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = pd.to_numeric(cycles["n_labels"]).to_numpy(dtype=float)
    promoted = cycles["promoted"].fillna(False).astype(bool).to_numpy()
    for column, name, colour in (TAG_METRICS if "micro_f1" in cycles else METRICS):
        y = pd.to_numeric(cycles[column]).to_numpy(dtype=float)
        scored = ~pd.isna(y)
        ax.plot(x[scored], y[scored], marker=".", color=colour, label=name,
                linewidth=2.2 if column == metric else 1.3, gid=column)
        ax.plot(x[scored & promoted], y[scored & promoted], linestyle="none", marker="o", markersize=7,
                markerfacecolor="none", markeredgecolor=colour, gid=f"{column}-promoted")
    if promoted.any():  # one legend entry for the rings of both lines
        ax.plot([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="0.3",
                label="model promoted")
    ax.set_xlabel("labels")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(top=1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    last = cycles.iloc[-1]
    ax.set_title(f"learning curve after cycle {int(last['cycle'])} ({int(last['n_labels'])} labels)",
                 fontsize="medium")
    fig.tight_layout()
    return fig


def png_bytes(fig, colors: int = 64) -> bytes:
    """``fig`` as PNG bytes, quantized to a palette of ``colors`` colours (a 480x240 curve
    is ~5 KB instead of ~16 KB in RGBA; it travels base64 in every cycle's artifacts)."""
    from PIL import Image

    canvas = fig.canvas
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    buffer = io.BytesIO()
    image.convert("RGB").quantize(colors=colors).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def learning_curve_png(cycles: pd.DataFrame, metric: str | None = None) -> bytes:
    """The learning curve (:func:`learning_curve_figure`) as PNG bytes, 480x240 pixels."""
    return png_bytes(learning_curve_figure(cycles, metric))
