"""`Split`: image paths with contiguous integer labels, and the ways splits are built."""

import dataclasses

import numpy as np

from pnpp_tf.errors import UserError


@dataclasses.dataclass
class Split:
    """Image paths and their labels; `class_names[label]` names each label.

    Checked when built: one integer label per path, each in [0, len(class_names)). The loss can
    check labels only when run eagerly; in training's compiled step an out-of-range label is a
    kernel error, a NaN or a silently wrong loss, depending on the device and loss variant.

    Raises:
        UserError: labels that are not integers, not one per path, or out of range.
    """

    paths: list
    labels: np.ndarray
    class_names: list

    def __post_init__(self):
        self.labels = np.asarray(self.labels)
        _check_labels(self.labels, len(self.paths), len(self.class_names))

    def __len__(self):
        return len(self.paths)

    @property
    def num_classes(self):
        return len(self.class_names)

    def without(self, paths):
        """This split without the images of `paths` (a set), labels and class names kept."""
        keep = np.array([path not in paths for path in self.paths], dtype=bool)
        return dataclasses.replace(self, paths=[p for p, k in zip(self.paths, keep) if k], labels=self.labels[keep])


def split_from_groups(groups, class_keys=None):
    """Builds a Split from {class key: image paths}.

    Args:
        groups: dict from a class key (name or id) to that class's image paths.
        class_keys: the label order; by default the sorted keys of `groups`. May hold keys absent
            from `groups` (e.g. a query/gallery label space shared by two splits).

    Returns:
        A `Split` whose label of a class is its position in `class_keys`.
    """
    class_keys = sorted(groups) if class_keys is None else list(class_keys)
    label_of = {key: label for label, key in enumerate(class_keys)}
    paths, labels = [], []
    for key in sorted(groups, key=label_of.__getitem__):
        paths.extend(groups[key])
        labels.extend([label_of[key]] * len(groups[key]))
    return Split(paths, np.asarray(labels, dtype=np.int64), [str(key) for key in class_keys])


def class_halves(split):
    """Splits the classes of `split` in two for the paper's stage 1 (`--mode=train`).

    The first half of the labels (the first `num_classes // 2`) trains, the rest validates, e.g.
    CUB classes 1-50 and 51-100. Both halves get labels from 0.

    Returns:
        (train_half, val_half) `Split`s.
    """
    if split.num_classes < 4:
        raise UserError(f"--mode=train halves the training classes; {split.num_classes} are too few (at least 4).")
    middle = split.num_classes // 2
    first = split.labels < middle
    return (
        _subset(split, first, label_offset=0, class_names=split.class_names[:middle]),
        _subset(split, ~first, label_offset=middle, class_names=split.class_names[middle:]),
    )


def _subset(split, mask, label_offset, class_names):
    paths = [path for path, keep in zip(split.paths, mask) if keep]
    return Split(paths, split.labels[mask] - label_offset, list(class_names))


def _check_labels(labels, num_paths, num_classes):
    """Raises a one-line UserError unless `labels` are num_paths integers in [0, num_classes)."""
    if labels.ndim != 1 or labels.shape[0] != num_paths:
        raise UserError(f"A split has {num_paths} image paths but labels of shape {labels.shape}; "
                        "it needs exactly one label per path.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"Split labels must be integers, got dtype {labels.dtype}; the dataset reader "
                        "must map each class to its index.")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        shown = ", ".join(str(label) for label in bad[:5].tolist()) + (" ..." if bad.size > 5 else "")
        raise UserError(f"Split labels must be in [0, {num_classes}) (one per class name), got {shown}; "
                        "the dataset reader must number its classes from 0.")
