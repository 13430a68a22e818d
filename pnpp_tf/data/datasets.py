"""Dataset readers: each turns a dataset on disk into splits of (image paths, integer labels).

Every reader returns the splits of the zero-shot protocol: training classes and evaluation classes
are disjoint. Labels are contiguous from 0 within the training split, and within the evaluation
splits (query and gallery share theirs). `protocol(dataset)` says how each dataset is evaluated.
"""

import dataclasses
import os

from pnpp_tf.data import benchmarks, glyphs, image_check, tfds_prepared
from pnpp_tf.data.folder import read_folder_dataset
from pnpp_tf.data.split import class_halves
from pnpp_tf.errors import UserError

# Rendered once; the pipeline resizes them to --image_size.
GLYPHS_RENDER_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a dataset is evaluated: the K of Recall@K and whether NMI is reported."""

    ks: tuple
    nmi: bool


def _read_glyphs(data_dir):
    glyphs.ensure_glyphs(data_dir, image_size=GLYPHS_RENDER_SIZE)
    return read_folder_dataset(data_dir)


# RECIPE: Recall@{1,2,4,8} + NMI for CUB and Cars; {1,10,100,1000} for SOP; In-Shop queries the
# gallery at {1,10,20,30,40,50}. MAP@R and R-Precision are reported for all.
_READERS = {
    "folder": (read_folder_dataset, Protocol((1, 2, 4, 8), nmi=True)),
    "glyphs": (_read_glyphs, Protocol((1, 2, 4, 8), nmi=True)),
    "cub": (benchmarks.read_cub, Protocol((1, 2, 4, 8), nmi=True)),
    "cars196": (benchmarks.read_cars196, Protocol((1, 2, 4, 8), nmi=True)),
    "sop": (benchmarks.read_sop, Protocol((1, 10, 100, 1000), nmi=False)),
    "inshop": (benchmarks.read_inshop, Protocol((1, 10, 20, 30, 40, 50), nmi=False)),
    # The same benchmarks prepared by `tfds build` (pip install tensorflow-datasets), re-split by class.
    "tfds_cub": (tfds_prepared.read_tfds_cub, Protocol((1, 2, 4, 8), nmi=True)),
    "tfds_cars196": (tfds_prepared.read_tfds_cars196, Protocol((1, 2, 4, 8), nmi=True)),
    "tfds_sop": (tfds_prepared.read_tfds_sop, Protocol((1, 10, 100, 1000), nmi=False)),
}
DATASETS = tuple(_READERS)
SPLITS = ("train", "test", "query", "gallery", "train_half", "val_half")


def load_split(dataset, data_dir, split):
    """Reads one split of a dataset.

    Args:
        dataset: one of `DATASETS`.
        data_dir: where the dataset lives (for "glyphs": where it is rendered on first use).
        split: "train", "test" (CUB, Cars, SOP, folder, glyphs), "query" and "gallery" (In-Shop,
            folder with query/ and gallery/), or "train_half" and "val_half" (the first and second
            half of the training classes, for the paper's stage 1).

    Returns:
        (list of image paths, int64 numpy array of labels).
    """
    splits = load_splits(dataset, data_dir)
    if split in ("train_half", "val_half"):
        train_half, val_half = class_halves(splits["train"])
        chosen = train_half if split == "train_half" else val_half
        return chosen.paths, chosen.labels
    if split not in splits:
        raise UserError(f"Dataset {dataset!r} has splits {sorted(splits) + ['train_half', 'val_half']}, "
                         f"not {split!r}.")
    return splits[split].paths, splits[split].labels


def load_splits(dataset, data_dir):
    """Reads every split of a dataset.

    Args:
        dataset: one of `DATASETS`.
        data_dir: the dataset's directory.

    Returns:
        A dict from split name to `Split`: "train" plus either "test" or "query" and "gallery".
    """
    if dataset not in _READERS:
        raise UserError(f"Unknown --dataset={dataset!r}; choose one of {DATASETS}.")
    if not data_dir:
        raise UserError(f"--data_dir is required for --dataset={dataset}.")
    if not os.path.isdir(data_dir) and dataset != "glyphs":
        raise UserError(f"--data_dir={data_dir} does not exist or is not a directory.")
    reader, _ = _READERS[dataset]
    return reader(data_dir)


def protocol(dataset):
    """The `Protocol` (Recall@K values, NMI or not) of a dataset."""
    if dataset not in _READERS:
        raise UserError(f"Unknown --dataset={dataset!r}; choose one of {DATASETS}.")
    return _READERS[dataset][1]


def verify_images(paths):
    """Decodes every file as training would; raises ValueError naming the ones that fail."""
    bad = image_check.check_images(paths).bad
    if bad:
        shown = "; ".join(f"{path} ({reason})" for path, reason in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UserError(f"{len(bad)} unreadable image(s): {shown}{more}. Replace or remove them.")
