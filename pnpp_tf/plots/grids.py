"""Grids of image thumbnails: a query and its neighbours, framed and titled, as one PNG.

A grid is rows of `Cell`s of `CELL_WIDTH` x `CELL_HEIGHT` pixels under an optional
`GRID_HEADER`-pixel title; `grid_size` gives its pixel size. Each image is shown whole, padded
to a square.
"""

import dataclasses
import os

import numpy as np
from PIL import Image, ImageOps

from pnpp_tf.plots.figures import class_label, new_figure, save_png

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
    figure = new_figure((width, height), layout=None)
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
    save_png(figure, path)
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
        row = [Cell(query, f"query\n{class_label(class_names[query_labels[q]])}", QUERY)]
        for rank, (p, label, d) in enumerate(
                zip(neighbour_paths[q], neighbour_labels[q], distances[q]), start=1):
            same = label == query_labels[q]
            mark = "\u2713" if same else "\u2717"
            row.append(Cell(p, f"{mark} #{rank} d={d:.3f}\n{class_label(class_names[label])}",
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
