"""Shared fixtures: tiny on-disk datasets generated on the fly, a tiny model, and quiet TensorFlow logs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image


def write_image(path, rng, size=(40, 36), mode="RGB"):
    """Writes a random image file (format from the extension); returns its path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


def make_folder_dataset(root, train_classes=4, test_classes=3, images_per_class=4, seed=0,
                        eval_dirs=("test",)):
    """Builds `<root>/train/<class>/*.png` and `<root>/<eval_dir>/<class>/*` for each eval dir.

    Each class gets its own base colour so that the classes are learnable; images mix PNG, JPEG,
    greyscale and alpha to exercise the decoder.
    """
    rng = np.random.default_rng(seed)
    layout = {"train": [f"train_class_{i:02d}" for i in range(train_classes)]}
    for eval_dir in eval_dirs:
        layout[eval_dir] = [f"test_class_{i:02d}" for i in range(test_classes)]
    variants = [("png", "RGB"), ("jpg", "RGB"), ("png", "L"), ("png", "RGBA")]
    for split, classes in layout.items():
        for class_name in classes:
            for i in range(images_per_class):
                ext, mode = variants[i % len(variants)]
                write_image(os.path.join(root, split, class_name, f"img_{i}.{ext}"), rng, mode=mode)
    return str(root)


@pytest.fixture
def folder_dataset(tmp_path):
    return make_folder_dataset(tmp_path / "data")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny model_dir (small_cnn, 32 px, 16-d, random weights from seed 0) and its loaded embedder:
    {"model_dir", "embedder"}, one per test module."""
    import keras  # pylint: disable=import-outside-toplevel - most tests need no Keras

    from pnpp_tf.artifacts import load_embedder  # pylint: disable=import-outside-toplevel
    from pnpp_tf.modeling.model import build_embedder  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny_model") / "run"
    model_dir.mkdir()
    build_embedder("small_cnn", 32, 16, weights="none").save(model_dir / "embedder.keras")
    return {"model_dir": str(model_dir), "embedder": load_embedder(str(model_dir))}


def rows_to_normalise(seed, rows=6, dim=5):
    """Rows of norms from 1e-3 to 1e3, one of zeros and one under the 1e-12 clamp, and what the
    naive loop x / max(||x||, 1e-12) makes of them: (rows, unit rows), float64."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, dim)) * rng.uniform(1e-3, 1e3, size=(rows, 1))
    x[1] = 0.0
    x[3] = 1e-14  # below the clamp: divided by 1e-12, not by its norm
    return x, np.array([row / max(np.linalg.norm(row), 1e-12) for row in x])
