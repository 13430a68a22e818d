"""A full disk stops a write with one line naming the path and the space needed, and leaves no
partial file, no temporary and the earlier version of the file as it was."""

import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from cli_helpers import TINY_RUN, run_module
from conftest import make_folder_dataset
from full_disk import fill_leaving, listing, small_disk  # noqa: F401 - small_disk is a fixture
from pnpp_tf import plots
from pnpp_tf.artifacts import load_keras_model
from pnpp_tf.training.callbacks import SaveCheckpoints
from pnpp_tf.training.checkpoints import RunCheckpoint
from pnpp_tf.retrieval.search_index import SearchIndex
from pnpp_tf.io_utils import OutOfSpaceError, save_keras_atomic, write_json
from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder
from pnpp_tf.modeling.optimizers import TorchAdam

IMAGES = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
LABELS = np.arange(8) % 3


def assert_one_line_naming(error, path, needed=True):
    message = str(error)
    assert "\n" not in message and message.startswith(f"{path}: no space left on the device:")
    assert ("needs about" in message) == needed and "MB free" in message


@pytest.fixture
def trained():
    keras.utils.set_random_seed(0)
    model = ProxyNCAModel(build_embedder("small_cnn", 32, 8, weights=None), num_classes=3)
    model.compile(optimizer=TorchAdam(1e-3), proxy_optimizer=TorchAdam(1.0))
    model.fit(IMAGES, LABELS, batch_size=8, epochs=1, verbose=0)
    return model


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_in_charge(small_disk, trained):
    directory = small_disk / "checkpoints"
    checkpoint = RunCheckpoint(str(directory))
    checkpoint.save(trained, 1, {"history": {"loss": [1.0]}})
    size = sum(os.path.getsize(p) for p in glob.glob(str(directory / "ckpt-1.*")))
    failures = 0
    # However little is missing, whichever file the disk fills up in: whole or nothing.
    for number, free in enumerate((size // 2, size - 4096, size + 4096, size + 8192, size + 65536), start=2):
        before, latest = listing(directory), tf.train.latest_checkpoint(str(directory))
        filler = fill_leaving(small_disk, free)
        try:
            checkpoint.save(trained, number, {})
        except OutOfSpaceError as error:
            failures += 1
            assert_one_line_naming(error, directory / f"ckpt-{number}")
            assert listing(directory) == before
            assert tf.train.latest_checkpoint(str(directory)) == latest
        else:
            assert tf.train.latest_checkpoint(str(directory)) == str(directory / f"ckpt-{number}")
            assert not [name for name in listing(directory) if "temp" in name]
        os.remove(filler)
    assert failures >= 2  # at least the two tries with less space free than a checkpoint takes
    latest = tf.train.latest_checkpoint(str(directory))
    assert RunCheckpoint(str(directory)).restore_model(trained)[0] == int(latest.rsplit("-", 1)[1])


def test_a_full_disk_stops_training_at_the_checkpoint_with_the_error(small_disk, trained):
    directory = small_disk / "checkpoints"
    checkpoint = RunCheckpoint(str(directory))
    checkpoint.save(trained, 1, {})
    fill_leaving(small_disk, 1_000_000)
    save = SaveCheckpoints(checkpoint, lambda epoch, logs: {"history": {}}, steps_per_epoch=1, guard=None,
                           every_steps=0, first_step=0)
    with pytest.raises(OutOfSpaceError) as raised:
        trained.fit(IMAGES, LABELS, batch_size=8, epochs=2, initial_epoch=1, callbacks=[save], verbose=0)
    assert_one_line_naming(raised.value, directory / "ckpt-2")
    assert listing(directory) == ["checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index", "ckpt-1.json"]
    assert tf.train.latest_checkpoint(str(directory)) == str(directory / "ckpt-1")


def test_an_embedder_that_does_not_fit_leaves_the_earlier_file(small_disk):
    path = small_disk / "run" / "embedder.keras"
    small = build_embedder("small_cnn", 32, 8, weights=None)
    save_keras_atomic(small, str(path))
    earlier = path.read_bytes()
    fill_leaving(small_disk, 1_000_000)
    with pytest.raises(OutOfSpaceError) as raised:
        save_keras_atomic(build_embedder("small_cnn", 32, 16, weights=None), str(path))
    assert_one_line_naming(raised.value, path)
    assert listing(small_disk) == ["run", "run/embedder.keras"]
    assert path.read_bytes() == earlier
    assert load_keras_model(str(path)).output.shape[-1] == 8

    with pytest.raises(OutOfSpaceError):
        save_keras_atomic(small, str(small_disk / "other" / "embedder.keras"))
    assert listing(small_disk / "other") == []


def test_json_that_does_not_fit_leaves_the_earlier_file(small_disk):
    path = small_disk / "run" / "results.json"
    write_json(str(path), {"metrics": {"recall@1": 0.5}})
    fill_leaving(small_disk, 50_000)
    with pytest.raises(OutOfSpaceError) as raised:
        write_json(str(path), {"history": {"loss": list(range(100_000))}})
    assert_one_line_naming(raised.value, path)
    assert listing(small_disk) == ["run", "run/results.json"]
    assert json.loads(path.read_text()) == {"metrics": {"recall@1": 0.5}}


def test_an_index_that_does_not_fit_leaves_the_earlier_one(small_disk):
    path = small_disk / "photos.npz"
    SearchIndex(np.eye(3, dtype=np.float32), ["a.jpg", "b.jpg", "c.jpg"], {"num_images": 3}).save(str(path))
    fill_leaving(small_disk, 100_000)
    big = SearchIndex(np.zeros((10_000, 64), np.float32), [f"{i}.jpg" for i in range(10_000)], {})
    with pytest.raises(OutOfSpaceError) as raised:
        big.save(str(path))
    assert_one_line_naming(raised.value, path)
    assert listing(small_disk) == ["photos.npz"]
    assert SearchIndex.load(str(path)).paths == ["a.jpg", "b.jpg", "c.jpg"]


def test_a_plot_that_does_not_fit_is_not_left_half_drawn(small_disk):
    path = small_disk / "curves.png"
    fill_leaving(small_disk, 4096)
    with pytest.raises(OutOfSpaceError) as raised:
        plots.save_training_curves({"loss": [3.0, 2.0, 1.0]}, str(path))
    assert_one_line_naming(raised.value, path)
    assert listing(small_disk) == []


@pytest.mark.slow
def test_a_training_run_on_a_full_disk_stops_with_one_line_at_its_checkpoint(small_disk, tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")
    model_dir = small_disk / "run"
    fill_leaving(small_disk, 2_000_000)  # room for the logs, not for a checkpoint (about 14 MB)
    result = run_module("pnpp_tf.train", *TINY_RUN, "--dataset=folder", "--eval_ks=1", "--eval_every=0",
                        f"--data_dir={data_dir}", f"--model_dir={model_dir}")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("pnpp_tf.train: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].startswith(f"pnpp_tf.train: error: {model_dir / 'checkpoints' / 'ckpt-'}")
    assert "no space left on the device: needs about" in errors[0]
    assert not [name for name in listing(model_dir) if "ckpt" in name or "partial" in name]
    assert not (model_dir / "embedder.keras").exists() and not (model_dir / "results.json").exists()
