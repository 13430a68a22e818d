"""Readers of the four benchmarks of the paper, from their official on-disk layouts.

Each reader returns {split name: Split} with the zero-shot splits of the paper: training and
evaluation classes are disjoint, labels are contiguous from 0 within each side. Every listed image
must exist, and every malformed line is reported with its file and line number: nothing is
skipped.
"""

import os

import numpy as np

from pnpp_tf.data.split import split_from_groups
from pnpp_tf.errors import UserError

# RECIPE: CUB classes 1-100 train, 101-200 test; Cars196 classes 1-98 train, 99-196 test.
CUB_CLASSES, CUB_TRAIN_CLASSES = 200, 100
CARS_CLASSES, CARS_TRAIN_CLASSES = 196, 98


def read_cub(data_dir):
    """CUB-200-2011: `CUB_200_2011/images/<id>.<name>/<image>.jpg`, classes split by id.

    Args:
        data_dir: the `CUB_200_2011` directory, or the directory that contains it.
    """
    images_dir = _first_existing_dir(
        [os.path.join(data_dir, "images"), os.path.join(data_dir, "CUB_200_2011", "images")],
        f"--data_dir={data_dir} holds no CUB_200_2011/images/ folder (nor images/).",
    )
    train, test = {}, {}
    for folder in sorted(os.listdir(images_dir)):
        class_dir = os.path.join(images_dir, folder)
        if not os.path.isdir(class_dir):
            continue
        prefix = folder.split(".", 1)[0]
        if not prefix.isdigit() or not 1 <= int(prefix) <= CUB_CLASSES:
            raise UserError(
                f"{class_dir}: CUB class folders are named <id>.<name> with id in 1..{CUB_CLASSES} "
                f"(e.g. 001.Black_footed_Albatross), got {folder!r}."
            )
        images = sorted(os.path.join(class_dir, f) for f in os.listdir(class_dir) if not f.startswith("."))
        if not images:
            raise UserError(f"CUB class folder {class_dir} is empty.")
        (train if int(prefix) <= CUB_TRAIN_CLASSES else test)[int(prefix)] = images
    if not train or not test:
        raise UserError(f"{images_dir} needs classes 1-{CUB_TRAIN_CLASSES} (train) and "
                         f"{CUB_TRAIN_CLASSES + 1}-{CUB_CLASSES} (test); found ids {sorted({**train, **test})[:5]}...")
    return {"train": split_from_groups(train), "test": split_from_groups(test)}


def read_cars196(data_dir):
    """Cars196: `cars_annos.mat` (all 16,185 images, `relative_im_path`, 1-based `class`).

    Args:
        data_dir: the directory holding `cars_annos.mat` and the `car_ims/` folder.
    """
    import scipy.io  # pylint: disable=import-outside-toplevel  # only this reader needs it

    annotations_file = os.path.join(data_dir, "cars_annos.mat")
    if not os.path.isfile(annotations_file):
        raise UserError(f"{annotations_file} is missing: download cars_annos.mat into --data_dir={data_dir}.")
    try:
        annotations = scipy.io.loadmat(annotations_file, squeeze_me=True)["annotations"]
        paths, classes = annotations["relative_im_path"], annotations["class"]
    except (KeyError, ValueError, TypeError) as error:
        raise UserError(f"{annotations_file} has no annotations with relative_im_path and class "
                         f"fields ({error}).") from error
    train, test = {}, {}
    for entry, (path, class_id) in enumerate(zip(np.atleast_1d(paths), np.atleast_1d(classes)), start=1):
        where = f"{annotations_file}, annotation {entry}"
        class_id = int(class_id)
        if not 1 <= class_id <= CARS_CLASSES:
            raise UserError(f"{where}: class {class_id} is outside 1..{CARS_CLASSES}.")
        group = train if class_id <= CARS_TRAIN_CLASSES else test
        group.setdefault(class_id, []).append(_existing(data_dir, str(path), where))
    return {"train": split_from_groups(train), "test": split_from_groups(test)}


def read_sop(data_dir):
    """Stanford Online Products: `Ebay_train.txt` / `Ebay_test.txt`
    (`image_id class_id super_class_id path`, one header line).

    Args:
        data_dir: the `Stanford_Online_Products` directory.
    """
    splits = {}
    for split, file_name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        rows = _read_table(os.path.join(data_dir, file_name), header_lines=1, columns=4)
        groups = {}
        for where, (_, class_id, _, path) in rows:
            groups.setdefault(_integer(class_id, where, "class_id"), []).append(_existing(data_dir, path, where))
        splits[split] = groups
    overlap = sorted(set(splits["train"]) & set(splits["test"]))
    if overlap:
        raise UserError(f"{data_dir}: class ids {overlap[:5]} are in Ebay_train.txt and Ebay_test.txt; "
                         "the zero-shot protocol needs disjoint classes.")
    return {name: split_from_groups(groups) for name, groups in splits.items()}


def read_inshop(data_dir):
    """In-Shop Clothes Retrieval: `Eval/list_eval_partition.txt` (entry count, header, then
    `image_name item_id evaluation_status` with status train, query or gallery).

    Args:
        data_dir: the In-Shop directory, holding `Eval/` and `img/`.
    """
    list_file = os.path.join(data_dir, "Eval", "list_eval_partition.txt")
    rows = _read_table(list_file, header_lines=2, columns=3)
    declared = _read_declared_count(list_file)
    if declared != len(rows):
        raise UserError(f"{list_file}: line 1 declares {declared} entries but {len(rows)} follow; "
                         "the file is truncated or edited.")
    groups = {"train": {}, "query": {}, "gallery": {}}
    for where, (path, item_id, status) in rows:
        if status not in groups:
            raise UserError(f"{where}: evaluation_status must be train, query or gallery, got {status!r}.")
        groups[status].setdefault(item_id, []).append(_existing(data_dir, path, where))
    overlap = sorted(set(groups["train"]) & (set(groups["query"]) | set(groups["gallery"])))
    if overlap:
        raise UserError(f"{list_file}: items {overlap[:5]} are in train and in query/gallery.")
    # Query and gallery share one label space: an item's label is the same on both sides.
    eval_items = sorted(set(groups["query"]) | set(groups["gallery"]))
    return {
        "train": split_from_groups(groups["train"]),
        "query": split_from_groups(groups["query"], eval_items),
        "gallery": split_from_groups(groups["gallery"], eval_items),
    }


def _read_table(path, header_lines, columns):
    """[(\"file:line\", fields)] of a whitespace-separated list file, after its header lines."""
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: --data_dir must point at the unpacked dataset.")
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if number <= header_lines or not line.strip():
                continue
            fields = line.split()
            if len(fields) != columns:
                raise UserError(f"{path}:{number}: expected {columns} columns, got {len(fields)}: {line.strip()!r}.")
            rows.append((f"{path}:{number}", fields))
    if not rows:
        raise UserError(f"{path} lists no images.")
    return rows


def _read_declared_count(path):
    with open(path, encoding="utf-8") as file:
        first = file.readline().strip()
    return _integer(first, f"{path}:1", "the entry count")


def _integer(text, where, what):
    try:
        return int(text)
    except ValueError as error:
        raise UserError(f"{where}: {what} must be an integer, got {text!r}.") from error


def _existing(data_dir, relative_path, where):
    path = os.path.join(data_dir, relative_path)
    if not os.path.isfile(path):
        raise UserError(f"{where}: image {path} does not exist.")
    return path


def _first_existing_dir(candidates, message):
    for candidate in candidates:
        if os.path.isdir(candidate):
            return candidate
    raise UserError(message)
