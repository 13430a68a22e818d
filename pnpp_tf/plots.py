"""Pictures of what a model learned: training curves, retrieval grids and a PCA of embeddings.

All figures are drawn on matplotlib `Figure` objects with the Agg canvas, never through pyplot,
so nothing here needs a display or touches pyplot's global state. Every PNG has a fixed pixel
size (no "tight" bounding box), given by `CURVES_SIZE`, `SCATTER_SIZE` and `grid_size`, and is
written whole or not at all.
"""

import dataclasses
import glob
import os
import re
import textwrap

import numpy as np
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps

DPI = 100
CURVES_SIZE = (1350, 420)  # pixels, width x height
SCATTER_SIZE = (1000, 720)
# A grid cell: a (CELL_WIDTH - 2 * _CELL_PAD)-pixel square image below up to three lines of text.
CELL_WIDTH = 150
CELL_HEIGHT = 200
GRID_HEADER = 40
_CELL_PAD = 7
_THUMBNAIL = CELL_WIDTH - 2 * _CELL_PAD

SAME_CLASS = "#1a9641"  # green
OTHER_CLASS = "#d7191c"  # red
QUERY = "#2b83ba"  # blue
NEUTRAL = "#9e9e9e"  # grey

_RECALL = re.compile(r"^(test|val)_recall@(\d+)$")
_MAP = re.compile(r"^(test|val)_map@r$")


# --- training curves -----------------------------------------------------------------------------


def save_training_curves(history, path, warmup_epochs=0, eval_every=1, epochs=None, title=None):
    """Draws loss, Recall@K (and MAP@R) and both learning rates per epoch, as a PNG.

    Args:
        history: {name: per-epoch values}, as results.json's "history" (or `fit().history`):
            "loss", "test_recall@K" or "val_recall@K", "test_map@r", "lr", "proxy_lr". Missing
            names leave their panel empty.
        path: the PNG to write.
        warmup_epochs: the first epochs with a frozen backbone, shaded.
        eval_every: `--eval_every` of the run: a metric with fewer values than "loss" was
            measured after every `eval_every`-th epoch.
        epochs: optional {name: 1-based epoch of each value}, overriding the above (e.g. from
            `read_tensorboard_history`).
        title: optional figure title.

    Returns:
        `path`; the image is `CURVES_SIZE` pixels.
    """
    series = _series(history, eval_every, epochs or {})
    figure = _figure(CURVES_SIZE)
    loss_axes, recall_axes, lr_axes = figure.subplots(1, 3)
    last_epoch = max((int(x[-1]) for x, _ in series.values() if len(x)), default=1)

    for axes in (loss_axes, recall_axes, lr_axes):
        axes.set_xlabel("epoch")
        axes.set_xlim(0.5, last_epoch + 0.5)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if warmup_epochs:
            axes.axvspan(0.5, warmup_epochs + 0.5, color="0.88", zorder=0,
                         label="warm-up (backbone frozen)" if axes is loss_axes else None)

    _plot(loss_axes, series, "loss", "training loss", color="black")
    loss_axes.set_title("ProxyNCA++ loss")

    recall_names = sorted((name for name in series if _RECALL.match(name)),
                          key=lambda name: int(_RECALL.match(name).group(2)))
    for name in recall_names:
        k = int(_RECALL.match(name).group(2))
        _plot(recall_axes, series, name, f"Recall@{k}", linewidth=2.4 if k == 1 else 1.2)
    for name in (n for n in series if _MAP.match(n)):
        _plot(recall_axes, series, name, "MAP@R", linestyle="--", color="0.3")
    split = next((m.group(1) for m in map(_RECALL.match, recall_names) if m), "test")
    recall_axes.set_title(f"retrieval on the {'validation' if split == 'val' else 'test'} classes")
    recall_axes.set_ylim(0, 1)

    # One log axis: the two rates are orders of magnitude apart, and their drops show as steps.
    for name, what, colour in (("lr", "backbone + embedding", "tab:blue"),
                               ("proxy_lr", "proxies", "tab:orange")):
        if name in series:
            values = series[name][1]
            label = f"{name} ({what}): {values[0]:.0e} \u2192 {values[-1]:.0e}"
            _plot(lr_axes, series, name, label, color=colour, drawstyle="steps-mid")
    if any((series[n][1] > 0).all() for n in ("lr", "proxy_lr") if n in series):
        lr_axes.set_yscale("log")
    lr_axes.set_title("learning rates")

    for axes in (loss_axes, recall_axes, lr_axes):
        if any(line.get_label() and not line.get_label().startswith("_") for line in axes.lines):
            axes.legend(fontsize=8, loc="best")
        else:
            axes.text(0.5, 0.5, "not recorded", transform=axes.transAxes, ha="center",
                      color="0.5")
    if title:
        figure.suptitle(title)
    _save(figure, path)
    return path


def read_tensorboard_history(log_dir):
    """Per-epoch scalars from the Keras TensorBoard logs of a run (`<model_dir>/logs`).

    Reads `<log_dir>/train/events.*` (or `log_dir` itself), where Keras writes "epoch_<name>"
    at 0-based step = epoch. If several runs wrote there, later files win. A truncated last
    record (an interrupted run) ends that file's reading.

    Returns:
        (history {name: values}, epochs {name: 1-based epochs}), for `save_training_curves`.

    Raises:
        ValueError: if there are no event files.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel - only this reader needs it

    folder = os.path.join(log_dir, "train")
    folder = folder if os.path.isdir(folder) else log_dir
    files = sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")))
    if not files:
        raise ValueError(f"No TensorBoard event files in {folder}.")
    by_epoch = {}
    for file in files:
        try:
            for record in tf.data.TFRecordDataset(file):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if not value.tag.startswith("epoch_"):
                        continue
                    number = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                              else float(value.simple_value))
                    by_epoch.setdefault(value.tag[len("epoch_"):], {})[int(event.step) + 1] = number
        except tf.errors.DataLossError:
            logging.warning("%s ends in a truncated record; using what precedes it", file)
    by_epoch.pop("learning_rate", None)  # Keras' own copy of "lr"
    history = {name: [v for _, v in sorted(values.items())] for name, values in by_epoch.items()}
    epochs = {name: sorted(values) for name, values in by_epoch.items()}
    return history, epochs


def _series(history, eval_every, epochs):
    """{name: (1-based epochs, values)} of every non-empty entry of `history`."""
    num_epochs = max((len(v) for v in history.values()), default=0)
    num_epochs = len(history.get("loss", ())) or num_epochs
    series = {}
    for name, values in history.items():
        values = [float(v) for v in values]
        if not values:
            continue
        if name in epochs:
            x = list(epochs[name])
        elif len(values) == num_epochs:
            x = list(range(1, num_epochs + 1))
        else:
            evaluated = [e for e in range(1, num_epochs + 1) if eval_every and e % eval_every == 0]
            if len(evaluated) == len(values):
                x = evaluated
            else:
                logging.warning("history[%r] has %d values for %d epochs; drawn at the last ones",
                                name, len(values), num_epochs)
                x = list(range(max(num_epochs, len(values)) - len(values) + 1,
                               max(num_epochs, len(values)) + 1))
        series[name] = (np.asarray(x, float), np.asarray(values, float))
    return series


def _plot(axes, series, name, label, **style):
    if name in series:
        x, y = series[name]
        axes.plot(x, y, label=label, marker="o" if len(x) < 30 else None, markersize=3, **style)


# --- image grids ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    """One grid cell: an image path (None for an empty cell) under a title, in an optional frame."""

    path: str = None
    title: str = ""
    frame: str = None


def grid_size(num_rows, num_columns, title=True):
    """(width, height) in pixels of a grid of `num_rows` x `num_columns` cells."""
    return num_columns * CELL_WIDTH, num_rows * CELL_HEIGHT + (GRID_HEADER if title else 0)


def save_image_grid(rows, path, title=None):
    """Draws rows of `Cell`s (None: an empty cell) as a PNG of `grid_size` pixels.

    Each image is shown whole, padded to a square; an unreadable one as the word "unreadable".
    Returns `path`.
    """
    num_columns = max((len(row) for row in rows), default=0)
    if not rows or not num_columns:
        raise ValueError("An image grid needs at least one cell.")
    width, height = grid_size(len(rows), num_columns, bool(title))
    figure = _figure((width, height), layout=None)
    top = height - (GRID_HEADER if title else 0)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            left = c * CELL_WIDTH + _CELL_PAD
            bottom = top - (r + 1) * CELL_HEIGHT + _CELL_PAD
            axes = figure.add_axes([left / width, bottom / height, _THUMBNAIL / width,
                                    _THUMBNAIL / height])
            _draw_cell(axes, cell)
    if title:
        figure.text(0.5, 1 - GRID_HEADER / 2 / height, title, ha="center", va="center", fontsize=11)
    _save(figure, path)
    return path


def save_search_grid(query_path, neighbour_paths, distances, path, max_columns=10, title=None):
    """The query, then its neighbours titled with their rank, distance, folder and file name.

    Neighbours wrap onto further rows after `max_columns - 1` per row. Returns `path`.
    """
    per_row = max(1, int(max_columns) - 1)
    cells = [Cell(p, f"#{rank} d={d:.4f}\n{_file_label(p)}", NEUTRAL)
             for rank, (p, d) in enumerate(zip(neighbour_paths, distances), start=1)]
    rows = []
    for start in range(0, max(len(cells), 1), per_row):
        first = Cell(query_path, f"query\n{_file_label(query_path)}", QUERY) if start == 0 else None
        rows.append([first] + cells[start:start + per_row])
    return save_image_grid(rows, path, title)


def save_retrieval_grid(query_paths, query_labels, neighbour_paths, neighbour_labels, distances,
                        class_names, path, title=None):
    """Rows of a query (blue frame) and its neighbours, framed green (same class) or red.

    Args:
        query_paths: Q image paths.
        query_labels: Q integer labels.
        neighbour_paths: Q lists of K paths, nearest first.
        neighbour_labels: [Q, K] integer labels.
        distances: [Q, K] distances shown in the titles.
        class_names: `class_names[label]` is shown above each image.
        path: the PNG to write.
        title: optional header.

    Returns:
        `path`; the image is `grid_size(Q, K + 1, title)` pixels.
    """
    rows = []
    for q, query in enumerate(query_paths):
        row = [Cell(query, f"query\n{_class_label(class_names[query_labels[q]])}", QUERY)]
        for rank, (p, label, d) in enumerate(
                zip(neighbour_paths[q], neighbour_labels[q], distances[q]), start=1):
            same = label == query_labels[q]
            mark = "\u2713" if same else "\u2717"
            row.append(Cell(p, f"{mark} #{rank} d={d:.3f}\n{_class_label(class_names[label])}",
                            SAME_CLASS if same else OTHER_CLASS))
        rows.append(row)
    return save_image_grid(rows, path, title)


def load_thumbnail(path, size=_THUMBNAIL):
    """The image at `path` as uint8 RGB [size, size, 3], whole and padded; None if unreadable."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                image = Image.new("RGB", rgba.size, "white")
                image.paste(rgba, mask=rgba.getchannel("A"))
            else:
                image = image.convert("RGB")
            image = ImageOps.pad(image, (size, size), Image.Resampling.LANCZOS,
                                 color=(240, 240, 240))
            return np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _draw_cell(axes, cell):
    axes.set_xticks([])
    axes.set_yticks([])
    image = load_thumbnail(cell.path) if cell.path else None
    if image is None:
        axes.set_facecolor("0.92")
        axes.text(0.5, 0.5, "unreadable", transform=axes.transAxes, ha="center", va="center",
                  color="0.4", fontsize=9)
    else:
        axes.imshow(image, aspect="auto", interpolation="antialiased")
    for spine in axes.spines.values():
        spine.set_color(cell.frame or "0.8")
        spine.set_linewidth(4 if cell.frame and cell.frame != NEUTRAL else 1)
    axes.set_title(cell.title, fontsize=7.5, pad=4, linespacing=1.15)


def _file_label(path):
    """The file's folder and name, on two lines."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f"{_short(folder)}/\n{_short(os.path.basename(path))}"


def _short(text, width=20):
    """`text` cut in the middle to at most `width` characters."""
    if len(text) <= width:
        return text
    half = (width - 1) // 2
    return f"{text[:half]}\u2026{text[-(width - 1 - half):]}"


def _class_label(name, width=22, lines=2):
    """A class name on at most `lines` lines of `width` characters (underscores read as spaces)."""
    wrapped = textwrap.wrap(str(name).replace("_", " "), width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][:width - 1] + "\u2026"
    return "\n".join(wrapped)


# --- embedding scatter ---------------------------------------------------------------------------


def save_embedding_scatter(embeddings, labels, class_names, path, title=None, max_legend=20):
    """A 2-D PCA of unit-normalised embeddings, one colour per class, as a PNG.

    Args:
        embeddings: float [N, D].
        labels: int [N].
        class_names: `class_names[label]` names each label (in the legend, up to `max_legend`
            classes).
        path: the PNG to write.
        title: optional title; the default says how many images and classes are shown.
        max_legend: most classes listed in the legend.

    Returns:
        `path`; the image is `SCATTER_SIZE` pixels.
    """
    from sklearn.decomposition import PCA  # pylint: disable=import-outside-toplevel

    embeddings = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or len(embeddings) < 3 or len(labels) != len(embeddings):
        raise ValueError(f"A scatter needs [N >= 3, D] embeddings and N labels; got "
                         f"{embeddings.shape} and {labels.shape}.")
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    components = min(2, unit.shape[1])
    pca = PCA(n_components=components, random_state=0)
    points = pca.fit_transform(unit)
    if components == 1:
        points = np.concatenate([points, np.zeros_like(points)], axis=1)
    classes = np.unique(labels)
    colours = _class_colours(len(classes))
    figure = _figure(SCATTER_SIZE)
    axes = figure.add_subplot()
    for colour, label in zip(colours, classes):
        chosen = labels == label
        axes.scatter(points[chosen, 0], points[chosen, 1], s=18, color=colour, alpha=0.8,
                     edgecolors="none", label=_class_label(class_names[label], 40, lines=1))
    variance = pca.explained_variance_ratio_
    axes.set_xlabel(f"PC 1 ({variance[0]:.0%} of the variance)")
    if components == 2:
        axes.set_ylabel(f"PC 2 ({variance[1]:.0%} of the variance)")
    axes.grid(alpha=0.3)
    axes.set_title(title or f"PCA of {len(labels)} embeddings of {len(classes)} classes")
    if len(classes) <= max_legend:
        axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=1.5,
                    frameon=False)
    _save(figure, path)
    return path


def _class_colours(count):
    from matplotlib import colormaps  # pylint: disable=import-outside-toplevel

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, count)]


# --- shared --------------------------------------------------------------------------------------


def _figure(size, layout="constrained"):
    figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path):
    """Writes the figure as a PNG at its own pixel size, through a temporary sibling."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    try:
        figure.savefig(partial, format="png", dpi=DPI, facecolor="white")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
