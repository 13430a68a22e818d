"""What every picture of `pnpp_tf.plots` shares: a fixed-size figure off pyplot, its PNG, labels.

Figures are matplotlib `Figure` objects on the Agg canvas, never pyplot's, so nothing needs a
display or touches pyplot's global state. A PNG is written at the figure's own pixel size (no
"tight" bounding box), whole or not at all (`pnpp_tf.io_utils.write_atomic`), locally or to any
path `tf.io.gfile` writes to.
"""

import io
import textwrap

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pnpp_tf.io_utils import write_atomic

DPI = 100


def new_figure(size, layout="constrained"):
    """An empty figure of `size` = (width, height) pixels on its own Agg canvas."""
    figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path):
    """Writes the figure as a PNG at its own pixel size, whole or not at all."""
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=DPI, facecolor="white")
    write_atomic(path, png.getvalue())


def class_label(name, width=22, lines=2):
    """A class name on at most `lines` lines of `width` characters (underscores read as spaces)."""
    wrapped = textwrap.wrap(str(name).replace("_", " "), width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][:width - 1] + "\u2026"
    return "\n".join(wrapped)
