"""Miniatures of the four benchmarks' official on-disk layouts, built on the fly with tiny images."""

import os

import numpy as np
from PIL import Image


def _image(path, rng, size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path)


def make_cub(root, train_ids=(1, 2, 3, 4), test_ids=(101, 102, 103), images_per_class=4, seed=0):
    """`<root>/CUB_200_2011/images/<id>.<name>/<name>_<n>.jpg`."""
    rng = np.random.default_rng(seed)
    for class_id in (*train_ids, *test_ids):
        folder = f"{class_id:03d}.Bird_{class_id}"
        for n in range(images_per_class):
            _image(os.path.join(root, "CUB_200_2011", "images", folder, f"Bird_{class_id}_{n}.jpg"), rng)
    return str(root)


def make_cars196(root, train_ids=(1, 2, 3, 4), test_ids=(99, 100, 101), images_per_class=4, seed=0,
                 annotations=None):
    """`<root>/cars_annos.mat` (a real MATLAB file) and `<root>/car_ims/<n>.jpg`.

    `annotations`, if given, replaces the generated list of (relative_im_path, class) pairs.
    """
    import scipy.io  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    if annotations is None:
        annotations = []
        for class_id in (*train_ids, *test_ids):
            for _ in range(images_per_class):
                path = f"car_ims/{len(annotations) + 1:06d}.jpg"
                _image(os.path.join(root, path), rng)
                annotations.append((path, class_id))
    record = np.dtype([("relative_im_path", object), ("bbox_x1", object), ("bbox_y1", object),
                       ("bbox_x2", object), ("bbox_y2", object), ("class", object), ("test", object)])
    table = np.array([(p, 1, 1, 8, 8, c, 0) for p, c in annotations], dtype=record)
    os.makedirs(root, exist_ok=True)
    scipy.io.savemat(os.path.join(root, "cars_annos.mat"), {"annotations": table[np.newaxis, :]})
    return str(root)


def make_sop(root, train_classes=4, test_classes=200, images_per_class=6, seed=0):
    """`<root>/Ebay_train.txt`, `Ebay_test.txt` (with their header) and the listed images."""
    rng = np.random.default_rng(seed)
    image_id = 0
    for file_name, first, count in (("Ebay_train.txt", 1, train_classes),
                                    ("Ebay_test.txt", train_classes + 1, test_classes)):
        lines = ["image_id class_id super_class_id path"]
        for class_id in range(first, first + count):
            for n in range(images_per_class):
                image_id += 1
                path = f"bicycle_final/{class_id}_{n}.JPG"
                _image(os.path.join(root, path), rng)
                lines.append(f"{image_id} {class_id} 1 {path}")
        _write(os.path.join(root, file_name), lines)
    return str(root)


def make_inshop(root, train_items=4, eval_items=12, train_images=4, query_images=2, gallery_images=5, seed=0):
    """`<root>/Eval/list_eval_partition.txt` (count line, header) and `<root>/img/...`."""
    rng = np.random.default_rng(seed)
    rows = []
    for item in range(1, train_items + eval_items + 1):
        item_id = f"id_{item:08d}"
        statuses = (["train"] * train_images if item <= train_items
                    else ["query"] * query_images + ["gallery"] * gallery_images)
        for n, status in enumerate(statuses):
            path = f"img/WOMEN/Dresses/{item_id}/{n:02d}_1_front.jpg"
            _image(os.path.join(root, path), rng)
            rows.append(f"{path} {item_id} {status}")
    _write(os.path.join(root, "Eval", "list_eval_partition.txt"),
           [str(len(rows)), "image_name item_id evaluation_status", *rows])
    return str(root)


def _write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
