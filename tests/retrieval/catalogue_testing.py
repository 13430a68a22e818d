"""What the catalogue tests share (`test_catalogue.py`, the update; `test_catalogue_search.py`, the
shards and search): small folders and rows, a hand-written catalogue, one-line error checks."""

import os
import re

import numpy as np
import pytest

from cli_helpers import REPO
from conftest import make_folder_dataset
from pnpp_tf.io_utils import write_json
from pnpp_tf.retrieval import catalogue as catalogue_lib
from pnpp_tf.retrieval import neighbours
from pnpp_tf.retrieval.shards import Shard

IMAGE_SIZE = 32  # as conftest.tiny_model
EMBEDDING_DIM = 16  # as conftest.tiny_model
CHILD = str(REPO / "tests" / "catalogue_child.py")
# int8 codes q of a row x quantised in steps s = max|x| / 127: |x / s - q| <= 1/2, plus the float32
# rounding of s and of x / s (each at most 127 units of 2^-24, in units of s).
INT8_SLACK = 2 * 127 * 2.0 ** -24


def photos_folder(root, seed=0):
    """12 images: train/ 2 classes x 4, test/ 1 class x 4 (PNG, JPEG, greyscale, alpha)."""
    return make_folder_dataset(root, train_classes=2, test_classes=1, images_per_class=4, seed=seed)


def exact_rows(count, dim=8, seed=0):
    """float32 rows whose unit rows and dot products are exact in float32: each has 1 or 4
    non-zero entries of +-1 (norm 1 or 2), so unit entries are 0, +-1/2 or +-1 and every dot
    product is a sum of a few multiples of 1/4. Scores tie often, as the order must settle."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((count, dim), np.float32)
    for row in rows:
        chosen = rng.choice(dim, size=rng.choice([1, 4]), replace=False)
        row[chosen] = rng.choice([-1.0, 1.0], size=len(chosen))
    return rows


def write_catalogue(directory, rows, shard_size, dtype="float32", approximate=None, params=None):
    """A catalogue written directly (no images, no model): shards of `shard_size` rows and a manifest
    as `update_catalogue` writes them; item i is img_<i>.png. With `approximate` (a backend), each
    shard gets its structure."""
    os.makedirs(directory)
    entries = []
    for number, start in enumerate(range(0, len(rows), shard_size)):
        part = rows[start:start + shard_size]
        structure = None
        if approximate:
            from pnpp_tf.retrieval import ann  # pylint: disable=import-outside-toplevel

            structure = ann.build(approximate, neighbours.unit_rows(part), params, dtype)
        name = f"shard-{number:06d}"
        Shard.write(os.path.join(directory, name), part,
                    [(f"img_{start + i}.png", 1000 + start + i, 7) for i in range(len(part))], dtype, structure)
        entries.append({"name": name, "count": len(part)})
    write_json(os.path.join(directory, catalogue_lib.MANIFEST), {
        "format": catalogue_lib.FORMAT, "format_version": catalogue_lib.FORMAT_VERSION, "model": "hand-written",
        "model_kind": "keras", "model_stamp": None, "image_size": IMAGE_SIZE, "embedding_dim": int(rows.shape[1]),
        "dtype": dtype, "distance": "cosine", "images_root": "/nowhere", "shards": entries,
        "approximate": {"backend": approximate, "params": params.to_json()} if approximate else None,
        "next_shard": len(entries), "skipped": [], "created": "today"})
    return str(directory)


def child_env():
    """This process' environment, the repository importable and TensorFlow's C++ log quiet."""
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=python_path, TF_CPP_MIN_LOG_LEVEL="2")


def directory_bytes(directory):
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(directory) for name in names)


def rows_by_path(catalogue):
    """{relative path: the bytes of its stored row (and scale)} of an opened catalogue."""
    rows = {}
    for shard in catalogue.shards:
        for row, path in enumerate(shard.relative_paths()):
            scale = b"" if shard.scales is None else np.asarray(shard.scales[row]).tobytes()
            rows[path] = np.asarray(shard.embeddings[row]).tobytes() + scale
    return rows


def one_line(raised, pattern, **paths):
    """Asserts that the error of `raised` is one line matching `pattern`, whose {name} fields are
    the `paths` given by name (matched literally)."""
    message = str(raised.value)
    assert "\n" not in message, message
    pattern = pattern.format(**{name: re.escape(str(path)) for name, path in paths.items()})
    assert re.search(pattern, message), message


def readable_images(photos):
    return sorted(os.path.relpath(os.path.join(folder, name), photos)
                  for folder, _, names in os.walk(photos) for name in names if name.startswith("img_"))


def import_ann(backend):
    """`pnpp_tf.retrieval.ann`, skipping the test without it or without `backend`'s library."""
    ann = pytest.importorskip("pnpp_tf.retrieval.ann")
    pytest.importorskip({"hnsw": "usearch.index", "ivfpq": "faiss"}[backend])
    return ann
