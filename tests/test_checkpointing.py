"""A run resumes from the newest intact checkpoint: a cut-short, emptied or missing one is
reported by name and passed over, never silently traded for a fresh start."""

import glob
import logging
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from pnpp_tf.training.checkpoints import RunCheckpoint
from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder
from pnpp_tf.modeling.optimizers import TorchAdam

IMAGES = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
LABELS = np.arange(8) % 3
DATA = "ckpt-{}.data-00000-of-00001"


def compiled_model(seed):
    keras.utils.set_random_seed(seed)
    model = ProxyNCAModel(build_embedder("small_cnn", 32, 8, weights=None), num_classes=3)
    model.compile(optimizer=TorchAdam(1e-3), proxy_optimizer=TorchAdam(1.0))
    return model


def weights(model):
    return model.embedder.get_weights() + [model.loss_layer.proxies.numpy()]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Checkpoints ckpt-1..3 of three one-step epochs, and the weights and optimiser step counts
    each holds."""
    directory = tmp_path_factory.mktemp("pristine") / "checkpoints"
    model, checkpoint, saved = compiled_model(seed=1), RunCheckpoint(str(directory)), {}
    for epoch in (1, 2, 3):
        model.fit(IMAGES, LABELS, batch_size=8, epochs=1, verbose=0)
        checkpoint.save(model, epoch, {"history": {"loss": [float(epoch)] * epoch}})
        saved[epoch] = (weights(model), int(model.optimizer.iterations.numpy()))
    return directory, saved


@pytest.fixture
def run_dir(pristine, tmp_path):
    """A copy of the pristine checkpoints to damage, and what each one holds."""
    directory, saved = pristine
    copy = tmp_path / "checkpoints"
    shutil.copytree(directory, copy)
    return copy, saved


def resume(directory):
    """Restores a fresh model as the trainer does: model first, then (compiled) its optimisers."""
    checkpoint, model = RunCheckpoint(str(directory)), compiled_model(seed=2)
    epochs, record = checkpoint.restore_model(model)
    checkpoint.restore_optimizers(model)
    return checkpoint, model, epochs, record


def assert_holds(model, saved_state):
    saved_weights, saved_iterations = saved_state
    for restored, expected in zip(weights(model), saved_weights):
        np.testing.assert_array_equal(restored, expected)
    assert int(model.optimizer.iterations.numpy()) == saved_iterations


def warnings_of(caplog):
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def cut_data(directory, number):
    with open(directory / DATA.format(number), "r+b") as file:
        file.truncate(1000)


def empty_index(directory, number):
    (directory / f"ckpt-{number}.index").write_bytes(b"")


@pytest.mark.slow
@pytest.mark.parametrize("damage, bad_file", [(cut_data, DATA.format(3)), (empty_index, "ckpt-3.index")])
def test_a_damaged_newest_checkpoint_is_named_and_passed_over(run_dir, caplog, damage, bad_file):
    directory, saved = run_dir
    damage(directory, 3)
    with caplog.at_level(logging.WARNING):
        checkpoint, model, epochs, record = resume(directory)
    assert epochs == 2 and record["history"] == {"loss": [2.0, 2.0]}
    assert_holds(model, saved[2])  # the model and the optimisers, from the same checkpoint
    assert checkpoint.latest == str(directory / "ckpt-2")
    passed_over = [m for m in warnings_of(caplog) if "unreadable" in m]
    assert len(passed_over) == 1 and str(directory / bad_file) in passed_over[0]
    assert any(f"Resuming from {directory / 'ckpt-2'}" in m for m in warnings_of(caplog))

    # Training on writes its checkpoint over the damaged one, which then resumes cleanly.
    model.fit(IMAGES, LABELS, batch_size=8, epochs=1, verbose=0)
    assert checkpoint.save(model, 3, record) == str(directory / "ckpt-3")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, again, epochs, _ = resume(directory)
    assert epochs == 3 and not warnings_of(caplog)
    assert_holds(again, (weights(model), int(model.optimizer.iterations.numpy())))


def test_a_listed_checkpoint_whose_files_are_gone_is_passed_over(run_dir, caplog):
    directory, saved = run_dir
    for path in glob.glob(str(directory / "ckpt-3.*")):
        os.remove(path)
    with caplog.at_level(logging.WARNING):
        _, model, epochs, _ = resume(directory)
    assert epochs == 2
    assert_holds(model, saved[2])
    assert any(f"{directory / 'ckpt-3.index'} is missing" in m for m in warnings_of(caplog))


@pytest.mark.parametrize("cut", ["empty", "mid-line"])
def test_an_unreadable_index_falls_back_to_the_checkpoints_beside_it(run_dir, caplog, cut):
    directory, saved = run_dir
    index = directory / "checkpoint"
    text = index.read_text()
    index.write_text("" if cut == "empty" else text[:text.index("all_model_checkpoint_paths") + 12])
    with caplog.at_level(logging.WARNING):
        checkpoint, model, epochs, _ = resume(directory)
    assert epochs == 3
    assert_holds(model, saved[3])
    assert any(f"{index}, the index of the checkpoints, is unreadable" in m for m in warnings_of(caplog))

    # The next save leaves a readable index, and the oldest checkpoint goes as usual (keep=3).
    checkpoint.save(model, 4, {})
    state = tf.train.get_checkpoint_state(str(directory))
    assert state.model_checkpoint_path == str(directory / "ckpt-4")
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-2", "ckpt-3", "ckpt-4"]
    assert not glob.glob(str(directory / "ckpt-1.*"))


def test_no_intact_checkpoint_is_a_one_line_error_not_a_fresh_start(run_dir):
    directory, _ = run_dir
    cut_data(directory, 3)
    empty_index(directory, 2)
    cut_data(directory, 1)
    with pytest.raises(ValueError) as raised:
        resume(directory)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{directory}: no intact checkpoint to resume from")
    for bad_file in (DATA.format(3), "ckpt-2.index", DATA.format(1)):
        assert str(directory / bad_file) in message
    assert f"move {directory} away to start the run afresh" in message


def test_both_restores_use_the_checkpoint_chosen_first(run_dir):
    directory, saved = run_dir
    good = (directory / DATA.format(3)).read_bytes()
    cut_data(directory, 3)
    checkpoint, model = RunCheckpoint(str(directory)), compiled_model(seed=2)
    assert checkpoint.restore_model(model)[0] == 2
    (directory / DATA.format(3)).write_bytes(good)  # ckpt-3 is whole again before the optimisers
    checkpoint.restore_optimizers(model)
    assert_holds(model, saved[2])
