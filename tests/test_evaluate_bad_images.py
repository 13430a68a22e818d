"""`evaluate` decodes each image once: bad images are found by the embedding pass itself, and
--on_bad_image=error|skip behaves as a check before embedding did."""

import collections
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_folder_dataset
from pnpp_tf import evaluate
from pnpp_tf.retrieval import embed
from pnpp_tf.retrieval.embed import ImageEmbedder
from pnpp_tf.config import EvaluateConfig
from pnpp_tf.data import image_check, load_splits
from pnpp_tf.data.image_check import drop_or_raise
from pnpp_tf.errors import UserError
from pnpp_tf.modeling.model import build_embedder

IMAGE_SIZE = 32


def config(data_dir, model_dir, **overrides):
    return EvaluateConfig(**{"dataset": "folder", "data_dir": data_dir, "model_dir": str(model_dir),
                             "eval_batch_size": 4, "eval_ks": (1, 2), "verbose": 0, **overrides})


@pytest.fixture
def model_dir(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    build_embedder("small_cnn", image_size=IMAGE_SIZE, embedding_dim=8, weights="none").save(
        directory / "embedder.keras")
    return directory


def break_images(data_dir, names):
    """Overwrites test/<class>/<file> for each (class, file) of `names` with bytes no decoder reads;
    returns their paths."""
    paths = []
    for class_name, file_name in names:
        path = os.path.join(data_dir, "test", class_name, file_name)
        with open(path, "wb") as file:
            file.write(b"not an image at all" if file_name.endswith(".jpg") else b"")
        paths.append(path)
    return paths


@pytest.fixture
def reads(monkeypatch):
    """Counts the reads of every file through `tf.io.read_file`, eager or inside tf.data graphs
    (a `py_function` runs once per read, unlike Python code traced into a graph)."""
    counts = collections.Counter()
    real_read = tf.io.read_file

    def note(path):
        counts[path.numpy().decode("utf-8")] += 1
        return np.int64(0)

    def counting_read(filename, name=None):
        noted = tf.py_function(note, [filename], tf.int64)
        with tf.control_dependencies([noted]):
            return real_read(filename, name=name)

    monkeypatch.setattr(tf.io, "read_file", counting_read)
    return counts


def test_each_good_image_is_read_once(tmp_path, model_dir, reads):
    data_dir = make_folder_dataset(tmp_path / "data", test_classes=3, images_per_class=5)
    bad = break_images(data_dir, [("test_class_01", "img_1.jpg")])
    results = evaluate.evaluate(config(data_dir, model_dir, on_bad_image="skip"))
    assert results["skipped_images"] == {"test": bad}
    test = load_splits("folder", data_dir)["test"]
    good = [path for path in test.paths if path not in bad]
    assert {path: reads[path] for path in good} == {path: 1 for path in good}
    # The bad one: once in the embedding pass, once more for the reason it fails.
    assert reads[bad[0]] == 2


def test_skip_gives_the_metrics_of_the_good_images_alone(tmp_path, model_dir):
    data_dir = make_folder_dataset(tmp_path / "data", test_classes=3, images_per_class=6)
    bad = break_images(data_dir, [("test_class_00", "img_1.jpg"), ("test_class_02", "img_4.png")])
    results = evaluate.evaluate(config(data_dir, model_dir, on_bad_image="skip",
                                       output_dir=str(tmp_path / "out")))
    assert results["skipped_images"] == {"test": sorted(bad)}
    assert results["num_query_images"] == 16
    on_disk = json.loads((tmp_path / "out" / "eval_folder.json").read_text())
    assert on_disk["skipped_images"] == {"test": sorted(bad)}

    # The reference: the same data without the bad files, evaluated as usual.
    clean_dir = shutil.copytree(data_dir, tmp_path / "clean")
    for path in bad:
        os.remove(os.path.join(clean_dir, os.path.relpath(path, data_dir)))
    clean = evaluate.evaluate(config(str(clean_dir), model_dir, output_dir=str(tmp_path / "clean_out")))
    assert clean["skipped_images"] == {} and clean["num_query_images"] == 16
    assert set(results["metrics"]) == set(clean["metrics"])
    for name, value in clean["metrics"].items():
        assert results["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_error_names_every_bad_file_as_the_start_up_check_did(tmp_path, model_dir):
    data_dir = make_folder_dataset(tmp_path / "data", test_classes=3, images_per_class=6)
    # One in the first batch, one far later: the pass stops at the first, the check finds both.
    bad = break_images(data_dir, [("test_class_00", "img_1.jpg"), ("test_class_02", "img_4.png")])
    test = load_splits("folder", data_dir)["test"]
    with pytest.raises(UserError) as check_first:
        drop_or_raise(test, "test", "error")
    with pytest.raises(UserError) as raised:
        evaluate.evaluate(config(data_dir, model_dir, output_dir=str(tmp_path / "out")))
    assert str(raised.value) == str(check_first.value)
    assert str(raised.value).startswith(f"2 unreadable image(s) in test: {bad[0]} (")
    assert f"; {bad[1]} (empty file)" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_error_embeds_only_up_to_the_first_bad_image(tmp_path, model_dir):
    data_dir = make_folder_dataset(tmp_path / "data", test_classes=3, images_per_class=6)
    bad = break_images(data_dir, [("test_class_00", "img_1.jpg"), ("test_class_02", "img_4.png")])
    paths = load_splits("folder", data_dir)["test"].paths
    embedder = ImageEmbedder(build_embedder("small_cnn", image_size=IMAGE_SIZE, embedding_dim=8, weights="none"),
                             IMAGE_SIZE)
    everything = embedder.embed_files(paths, batch_size=2, on_bad_image="skip")
    assert everything.embeddings.shape == (16, 8) and [path for path, _ in everything.skipped] == bad
    assert everything.paths == [path for path in paths if path not in bad] and everything.too_large == []
    batches = []
    with pytest.raises(UserError) as raised:
        embedder.embed_files(paths, batch_size=2, name="test", on_batch=lambda *batch: batches.append(batch))
    assert str(raised.value).startswith(f"2 unreadable image(s) in test: {bad[0]} (")
    assert f"; {bad[1]} (empty file)" in str(raised.value)  # found by the check, not the model
    # The model ran on the first batch only, the one that shows the first bad image left out.
    assert [batch[0] for batch in batches] == [[paths[0], paths[2]]]
    np.testing.assert_array_equal(batches[0][2], everything.embeddings[:2])


def test_a_file_that_fails_only_while_embedding_is_still_counted_bad(tmp_path, model_dir, monkeypatch):
    data_dir = make_folder_dataset(tmp_path / "data", test_classes=2, images_per_class=4)
    bad = break_images(data_dir, [("test_class_01", "img_1.jpg")])
    paths = load_splits("folder", data_dir)["test"].paths
    # As if the file were fixed between the pass and the check: the check finds nothing wrong.
    monkeypatch.setattr(image_check, "check_images",
                        lambda paths, **_: image_check.ImageCheck(len(paths), [], 0.0))
    model = build_embedder("small_cnn", image_size=IMAGE_SIZE, embedding_dim=8, weights="none")
    found = ImageEmbedder(model, IMAGE_SIZE).embed_files(paths, batch_size=3, on_bad_image="skip")
    assert len(found.embeddings) == 7 and len(found.paths) == 7
    assert found.skipped == [(bad[0], embed.CHANGED_DURING_RUN)]
