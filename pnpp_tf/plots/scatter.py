"""A 2-D PCA scatter of embeddings, one colour per class, as a `SCATTER_SIZE`-pixel PNG."""

import numpy as np

from pnpp_tf.retrieval import neighbours
from pnpp_tf.errors import UserError
from pnpp_tf.plots.figures import class_label, new_figure, save_png

SCATTER_SIZE = (1000, 720)  # pixels, width x height


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
        raise UserError(f"A scatter needs [N >= 3, D] embeddings and N labels; got "
                         f"{embeddings.shape} and {labels.shape}.")
    unit = neighbours.unit_rows(embeddings).astype(np.float64)
    components = min(2, unit.shape[1])
    pca = PCA(n_components=components, random_state=0)
    points = pca.fit_transform(unit)
    if components == 1:
        points = np.concatenate([points, np.zeros_like(points)], axis=1)
    classes = np.unique(labels)
    colours = _class_colours(len(classes))
    figure = new_figure(SCATTER_SIZE)
    axes = figure.add_subplot()
    for colour, label in zip(colours, classes):
        chosen = labels == label
        axes.scatter(points[chosen, 0], points[chosen, 1], s=18, color=colour, alpha=0.8,
                     edgecolors="none", label=class_label(class_names[label], 40, lines=1))
    variance = pca.explained_variance_ratio_
    axes.set_xlabel(f"PC 1 ({variance[0]:.0%} of the variance)")
    if components == 2:
        axes.set_ylabel(f"PC 2 ({variance[1]:.0%} of the variance)")
    axes.grid(alpha=0.3)
    axes.set_title(title or f"PCA of {len(labels)} embeddings of {len(classes)} classes")
    if len(classes) <= max_legend:
        axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=1.5,
                    frameon=False)
    save_png(figure, path)
    return path


def _class_colours(count):
    from matplotlib import colormaps  # pylint: disable=import-outside-toplevel

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, count)]
