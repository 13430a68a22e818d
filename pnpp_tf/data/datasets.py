"""Dataset readers: each turns a dataset on disk into splits of (image paths, integer labels).

Every reader returns the splits of the zero-shot protocol: training classes and evaluation classes
are disjoint. Labels are contiguous from 0 within the training split, and within the evaluation
splits (query and gallery share theirs).
"""

import concurrent.futures
import dataclasses
import os

import numpy as np
from absl import logging
from PIL import Image

from pnpp_tf.data import glyphs

DATASETS = ("folder", "glyphs")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Rendered once; the pipeline resizes them to --image_size.
GLYPHS_RENDER_SIZE = 64


@dataclasses.dataclass
class Split:
    """Image paths and their labels; `class_names[label]` names each label."""

    paths: list
    labels: np.ndarray
    class_names: list

    def __len__(self):
        return len(self.paths)

    @property
    def num_classes(self):
        return len(self.class_names)


def load_split(dataset, data_dir, split):
    """Reads one split of a dataset.

    Args:
        dataset: one of `DATASETS`.
        data_dir: where the dataset lives (for "glyphs": where it is rendered on first use).
        split: "train", "test", "query" or "gallery" (whichever the dataset has).

    Returns:
        (list of image paths, int64 numpy array of labels).
    """
    splits = load_splits(dataset, data_dir)
    if split not in splits:
        raise ValueError(f"Dataset {dataset!r} has splits {sorted(splits)}, not {split!r}.")
    return splits[split].paths, splits[split].labels


def load_splits(dataset, data_dir):
    """Reads every split of a dataset.

    Args:
        dataset: one of `DATASETS`.
        data_dir: the dataset's directory.

    Returns:
        A dict from split name to `Split`: "train" plus either "test" or "query" and "gallery".
    """
    if not data_dir:
        raise ValueError(f"--data_dir is required for --dataset={dataset}.")
    if dataset == "glyphs":
        glyphs.ensure_glyphs(data_dir, image_size=GLYPHS_RENDER_SIZE)
        return read_folder_dataset(data_dir)
    if dataset == "folder":
        return read_folder_dataset(data_dir)
    raise ValueError(f"Unknown --dataset={dataset!r}; choose one of {DATASETS}.")


def read_folder_dataset(data_dir):
    """Reads `<data_dir>/train/<class>/<image>` and `test/` (or `query/` + `gallery/`).

    Args:
        data_dir: the dataset root.

    Returns:
        A dict of `Split`s, see `load_splits`.
    """
    if not os.path.isdir(data_dir):
        raise ValueError(f"--data_dir={data_dir} does not exist or is not a directory.")
    present = {name for name in ("train", "test", "query", "gallery")
               if os.path.isdir(os.path.join(data_dir, name))}
    if "train" not in present:
        raise ValueError(f"{data_dir} has no train/ folder; expected train/<class>/<image> and test/<class>/<image>.")
    if "test" in present:
        eval_names = ["test"]
    elif {"query", "gallery"} <= present:
        eval_names = ["query", "gallery"]
    else:
        raise ValueError(f"{data_dir} needs a test/ folder, or query/ and gallery/ folders, beside train/.")

    train_classes = _list_images_by_class(os.path.join(data_dir, "train"))
    eval_classes = {name: _list_images_by_class(os.path.join(data_dir, name)) for name in eval_names}
    eval_class_names = sorted(set().union(*eval_classes.values()))
    overlap = sorted(set(train_classes) & set(eval_class_names))
    if overlap:
        raise ValueError(
            f"{len(overlap)} classes of {data_dir} are in train/ and in {'/'.join(eval_names)}/ "
            f"({', '.join(overlap[:5])}{', ...' if len(overlap) > 5 else ''}); zero-shot evaluation "
            "needs disjoint classes: move them to one side."
        )
    splits = {"train": _make_split(train_classes, sorted(train_classes))}
    for name, by_class in eval_classes.items():
        splits[name] = _make_split(by_class, eval_class_names)
    return splits


def verify_images(paths, max_workers=8):
    """Checks that every file opens as an image (header only, so it is fast).

    Args:
        paths: image file paths.
        max_workers: threads reading headers.

    Raises:
        ValueError: naming the unreadable files and how many there are.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        problems = [p for p in pool.map(_image_problem, paths) if p]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            f"{len(problems)} unreadable image(s): {'; '.join(problems[:3])}{more}. "
            "Replace or remove these files."
        )


def _image_problem(path):
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - parsing the header is the check
    except Exception as error:  # pylint: disable=broad-except
        detail = type(error).__name__ if path in str(error) else f"{type(error).__name__}: {error}"
        return f"{path} ({detail})"
    return None


def _list_images_by_class(split_dir):
    """{class name: sorted image paths} for the class folders in split_dir."""
    by_class = {}
    ignored = []
    for class_name in sorted(os.listdir(split_dir)):
        class_dir = os.path.join(split_dir, class_name)
        if not os.path.isdir(class_dir):
            ignored.append(class_dir)
            continue
        images = []
        for file_name in sorted(os.listdir(class_dir)):
            path = os.path.join(class_dir, file_name)
            if file_name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
                images.append(path)
            else:
                ignored.append(path)
        if not images:
            raise ValueError(
                f"Class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder."
            )
        by_class[class_name] = images
    if not by_class:
        raise ValueError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>.")
    if ignored:
        logging.warning("Ignored %d entries in %s that are not images in class folders, e.g. %s",
                        len(ignored), split_dir, ignored[0])
    return by_class


def _make_split(images_by_class, class_names):
    label_of = {name: label for label, name in enumerate(class_names)}
    paths, labels = [], []
    for name, images in images_by_class.items():
        paths.extend(images)
        labels.extend([label_of[name]] * len(images))
    return Split(paths, np.asarray(labels, dtype=np.int64), list(class_names))
