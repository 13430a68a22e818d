"""The `folder` layout: `<data_dir>/train/<class>/<image>` and `test/<class>/<image>` (or
`query/` + `gallery/`), class names being folder names."""

import os

from absl import logging

from pnpp_tf.data.split import split_from_groups
from pnpp_tf.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def read_folder_dataset(data_dir):
    """Reads `<data_dir>/train/<class>/<image>` and `test/` (or `query/` + `gallery/`).

    Args:
        data_dir: the dataset root.

    Returns:
        A dict of `Split`s, see `load_splits`.
    """
    present = {name for name in ("train", "test", "query", "gallery")
               if os.path.isdir(os.path.join(data_dir, name))}
    if "train" not in present:
        raise UserError(f"{data_dir} has no train/ folder; expected train/<class>/<image> and test/<class>/<image>.")
    if "test" in present:
        eval_names = ["test"]
    elif {"query", "gallery"} <= present:
        eval_names = ["query", "gallery"]
    else:
        raise UserError(f"{data_dir} needs a test/ folder, or query/ and gallery/ folders, beside train/.")

    train_classes = _list_images_by_class(os.path.join(data_dir, "train"))
    eval_classes = {name: _list_images_by_class(os.path.join(data_dir, name)) for name in eval_names}
    eval_class_names = sorted(set().union(*eval_classes.values()))
    overlap = sorted(set(train_classes) & set(eval_class_names))
    if overlap:
        raise UserError(
            f"{len(overlap)} classes of {data_dir} are in train/ and in {'/'.join(eval_names)}/ "
            f"({', '.join(overlap[:5])}{', ...' if len(overlap) > 5 else ''}); zero-shot evaluation "
            "needs disjoint classes: move them to one side."
        )
    splits = {"train": split_from_groups(train_classes)}
    for name, by_class in eval_classes.items():
        splits[name] = split_from_groups(by_class, eval_class_names)
    return splits


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
            raise UserError(
                f"Class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder."
            )
        by_class[class_name] = images
    if not by_class:
        raise UserError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>.")
    if ignored:
        logging.warning("Ignored %d entries in %s that are not images in class folders, e.g. %s",
                        len(ignored), split_dir, ignored[0])
    return by_class
