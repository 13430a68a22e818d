"""Interrupted runs resume where they stopped; finished runs are not retrained; NaNs stop a run."""

import dataclasses
import json
import math
import pathlib
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from cli_helpers import REPO, TINY_RUN, kill_after_first_checkpoint, run_module, run_python
from conftest import make_folder_dataset
from pnpp_tf import flags as pnpp_flags
from pnpp_tf.training.callbacks import NonFiniteGuard
from pnpp_tf.training.checkpoints import RunCheckpoint
from pnpp_tf.config import TrainConfig
from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder
from pnpp_tf.modeling.optimizers import TorchAdam

RUN = (*TINY_RUN, "--dataset=folder", "--eval_ks=1", "--eval_every=0", "--deterministic",
       "--warmup_epochs=1", "--epochs=5")


def embedder_weights(model_dir):
    return keras.saving.load_model(str(model_dir / "embedder.keras"), compile=False).get_weights()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A dataset and the weights of a run of RUN on it that nothing interrupted."""
    root = tmp_path_factory.mktemp("resume")
    data_dir = make_folder_dataset(root / "data", train_classes=4, images_per_class=24)
    result = run_module("pnpp_tf.train", *RUN, f"--data_dir={data_dir}", f"--model_dir={root / 'reference'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return data_dir, embedder_weights(root / "reference")


@pytest.mark.slow
@pytest.mark.parametrize("every_steps, delay, resumed_at", [
    (0, 0.5, "epochs done"),               # killed in the epoch after the first epoch checkpoint
    (1, 0.0, "steps of the next"),         # killed mid-epoch, right after a step checkpoint
])
def test_killed_run_resumes_and_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted, every_steps,
                                                                     delay, resumed_at):
    data_dir, reference = uninterrupted
    model_dir = tmp_path / "interrupted"
    args = (*RUN, f"--data_dir={data_dir}", f"--model_dir={model_dir}", f"--checkpoint_every_steps={every_steps}")
    kill_after_first_checkpoint([sys.executable, "-m", "pnpp_tf.train", *args], model_dir, delay)

    other = run_module("pnpp_tf.train", *args, "--lr=0.5")
    assert other.returncode == 2 and "unfinished run made with other flags (lr)" in other.stderr
    resumed = run_module("pnpp_tf.train", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr and resumed_at in resumed.stderr
    for ours, theirs in zip(embedder_weights(model_dir), reference):
        np.testing.assert_array_equal(ours, theirs)

    again = run_module("pnpp_tf.train", *args)
    assert again.returncode == 0 and "this run is finished; not training again" in again.stderr
    changed = run_module("pnpp_tf.train", *args, "--lr=0.5")
    assert changed.returncode == 2 and "finished run with other flags (lr)" in changed.stderr


@pytest.mark.slow
def test_several_steps_per_execution_train_the_same_weights(tmp_path, uninterrupted):
    data_dir, reference = uninterrupted  # 12 batches an epoch
    args = (*RUN, f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'run'}")
    uneven = run_module("pnpp_tf.train", *args, "--steps_per_execution=5")
    assert uneven.returncode == 2
    assert "--steps_per_execution=5 does not divide the 12 batches of an epoch; choose one of 1, 2, 3, 4, 6, 12" \
        in uneven.stderr
    result = run_module("pnpp_tf.train", *args, "--steps_per_execution=4")
    assert result.returncode == 0, result.stderr[-3000:]
    for ours, theirs in zip(embedder_weights(tmp_path / "run"), reference):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")
    model_dir = tmp_path / "run"
    common = (*TINY_RUN, "--dataset=folder", "--eval_ks=1", "--eval_every=0", "--warmup_epochs=0",
              f"--data_dir={data_dir}", f"--model_dir={model_dir}")
    assert run_module("pnpp_tf.train", *common, "--epochs=1").returncode == 0
    # Two more epochs, from a pipeline whose training images are all NaN.
    result = run_python(str(REPO / "tests" / "poisoned_train.py"), *common, "--epochs=3")
    assert result.returncode == 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("pnpp_tf.train: error:")]
    assert len(errors) == 1 and "Non-finite loss (nan) in epoch 2 at step 1" in errors[0]
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    assert latest in errors[0]
    assert json.loads(pathlib.Path(f"{latest}.json").read_text())["finished_epochs"] == 1  # the epoch before the fault
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints"))
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), name


@pytest.mark.slow
def test_a_nan_after_a_mid_epoch_resume_is_reported_at_its_step_in_the_epoch(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", images_per_class=8)
    model_dir = tmp_path / "run"
    common = (*TINY_RUN, "--dataset=folder", "--eval_ks=1", "--eval_every=0", "--warmup_epochs=0", "--epochs=1",
              "--checkpoint_every_steps=1", "--keep_checkpoints=100", f"--data_dir={data_dir}",
              f"--model_dir={model_dir}")
    assert run_module("pnpp_tf.train", *common).returncode == 0
    # Go back to the first mid-epoch checkpoint, then resume from it with a poisoned pipeline.
    checkpoints = str(model_dir / "checkpoints")
    first = tf.train.get_checkpoint_state(checkpoints).all_model_checkpoint_paths[0]
    record = json.loads(pathlib.Path(f"{first}.json").read_text())
    assert record["step_in_epoch"] > 0
    tf.compat.v1.train.update_checkpoint_state(checkpoints, first)
    result = run_python(str(REPO / "tests" / "poisoned_train.py"), *common)
    assert result.returncode == 3, result.stderr[-3000:]
    assert f"Non-finite loss (nan) in epoch 1 at step {record['step_in_epoch'] + 1}:" in result.stderr


class FakeModel:
    stop_training = False


def test_guard_counts_steps_from_the_start_of_a_resumed_epoch():
    guard = NonFiniteGuard(first_step=3)  # a fit resuming after step 3 of epoch 2
    guard.set_model(FakeModel())
    guard.on_epoch_begin(1)
    guard.on_train_batch_end(0, {"loss": 1.5})
    assert guard.tripped_at is None and not guard.model.stop_training
    guard.on_train_batch_end(1, {"loss": float("nan")})
    epoch, step, loss = guard.tripped_at
    assert (epoch, step) == (2, 5) and math.isnan(loss)
    assert guard.model.stop_training
    message = guard.message(types.SimpleNamespace(latest="checkpoints/ckpt-7"))
    assert message.startswith("Non-finite loss (nan) in epoch 2 at step 5: training stopped.")
    assert "The last good checkpoint is checkpoints/ckpt-7." in message


def test_guard_counts_the_epochs_after_a_resumed_one_from_their_first_step():
    guard = NonFiniteGuard(first_step=3)
    guard.set_model(FakeModel())
    guard.on_epoch_begin(1)
    guard.on_train_batch_end(0, {"loss": 1.5})
    guard.on_epoch_end(1, {"loss": 1.5})
    guard.on_epoch_begin(2)
    guard.on_train_batch_end(0, {"loss": float("inf")})
    assert guard.tripped_at == (3, 1, float("inf"))
    assert "in epoch 3 at step 1:" in guard.message(types.SimpleNamespace(latest=None))


def test_a_worker_writing_elsewhere_resumes_from_the_chiefs_checkpoints(tmp_path):
    def compiled_model(seed):
        keras.utils.set_random_seed(seed)
        model = ProxyNCAModel(build_embedder("small_cnn", 32, 8, weights=None), num_classes=3)
        model.compile(optimizer=TorchAdam(1e-3), proxy_optimizer=TorchAdam(1.0))
        model(np.zeros((1, 32, 32, 3), np.float32))
        return model

    chief = compiled_model(seed=1)
    RunCheckpoint(str(tmp_path / "model_dir")).save(chief, 2, {"history": {"loss": [1.0, 0.5]}})
    worker = compiled_model(seed=2)
    private = RunCheckpoint(str(tmp_path / "private"), restore_from=str(tmp_path / "model_dir"))
    epochs, record = private.restore_model(worker)
    assert epochs == 2 and record["history"] == {"loss": [1.0, 0.5]}
    for restored, saved in zip(worker.embedder.get_weights() + [worker.loss_layer.proxies.numpy()],
                               chief.embedder.get_weights() + [chief.loss_layer.proxies.numpy()]):
        np.testing.assert_array_equal(restored, saved)


def test_configs_compare_across_new_fields_and_cache_locations():
    defaults = TrainConfig(model_dir="run")
    # Recorded before --cache_dir and --cache_short_side existed, by a run that used no cache.
    earlier = {name: value for name, value in defaults.to_dict().items() if not name.startswith("cache_")}
    assert TrainConfig(model_dir="run", cache_dir="/scratch/a").changed_from(earlier) == ["cache_dir"]
    assert TrainConfig(model_dir="run", verbose=0).changed_from(earlier) == []
    # The same run, its cache in another place.
    cached = TrainConfig(model_dir="run", cache_dir="/scratch/b").to_dict()
    assert TrainConfig(model_dir="run", cache_dir="/elsewhere").changed_from(cached) == []
    assert TrainConfig(model_dir="run", lr=0.5, cache_short_side=64).changed_from(earlier) == [
        "cache_short_side", "lr"]
    # A list field compares with its JSON record, and with absl's strings that older runs recorded.
    assert TrainConfig(model_dir="run", lr_drop_epochs=(3, 5)).changed_from(
        {**earlier, "lr_drop_epochs": [3, 5]}) == []
    assert TrainConfig(model_dir="run", eval_ks=(1, 2, 4, 8), lr_drop_epochs=(10, 20)).changed_from(
        {**earlier, "eval_ks": ["1", "2", "4", "8"], "lr_drop_epochs": ["10", "20"]}) == []
    assert TrainConfig(model_dir="run").changed_from({**earlier, "eval_ks": ["1", "x"]}) == ["eval_ks"]


def test_a_resumed_run_may_train_longer_and_be_watched_differently():
    earlier = TrainConfig(epochs=40, verbose=1, eval_every=1, keep_checkpoints=3, model_dir="/old/place",
                          data_dir="/old/data").to_dict()
    now = TrainConfig(epochs=50, verbose=0, eval_every=5, keep_checkpoints=1, model_dir="/new/place",
                      data_dir="/new/data")
    assert now.changed_from(earlier, allowed={"epochs"}) == []
    assert now.changed_from(earlier) == ["epochs"]
    assert dataclasses.replace(now, temperature=1.0).changed_from(earlier, allowed={"epochs"}) == ["temperature"]


@pytest.mark.slow
def test_a_run_with_another_shape_is_refused_before_any_weight_is_restored(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")
    model_dir = tmp_path / "run"
    common = (*TINY_RUN, "--dataset=folder", "--eval_ks=1", "--eval_every=0", "--warmup_epochs=0", "--epochs=1",
              f"--data_dir={data_dir}", f"--model_dir={model_dir}")
    # The last checkpoint of that run, killed before it wrote results.json: 16-d embeddings.
    recorded = pnpp_flags.parse(TrainConfig, ["train", *common])
    model = ProxyNCAModel(build_embedder("small_cnn", 32, recorded.embedding_dim, weights=None), num_classes=4)
    model.compile(optimizer=TorchAdam(1e-3), proxy_optimizer=TorchAdam(1.0))
    model.optimizer.build(model.trainable_variables)
    model.proxy_optimizer.build(model.loss_layer.trainable_variables)
    RunCheckpoint(str(model_dir / "checkpoints")).save(model, 1, {"flags": recorded.to_dict(), "history": {}})
    result = run_module("pnpp_tf.train", *common, "--embedding_dim=8")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"pnpp_tf.train: error: --model_dir={model_dir} holds an unfinished run made with other flags "
        "(embedding_dim); rerun with its flags to resume it (see its results or checkpoints), or choose "
        "another --model_dir.")


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_passed_over_and_none_intact_is_one_line(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")
    model_dir = tmp_path / "run"
    common = (*TINY_RUN, "--dataset=folder", "--eval_ks=1", "--eval_every=0", f"--data_dir={data_dir}",
              f"--model_dir={model_dir}")
    assert run_module("pnpp_tf.train", *common).returncode == 0  # 1 warm-up + 2 epochs: 3 checkpoints
    checkpoints = model_dir / "checkpoints"
    *_, older, newest = tf.train.get_checkpoint_state(str(checkpoints)).all_model_checkpoint_paths
    with open(f"{newest}.data-00000-of-00001", "r+b") as file:
        file.truncate(1000)

    # Trained for one epoch more: from the intact checkpoint before the damaged one.
    resumed = run_module("pnpp_tf.train", *common, "--epochs=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{newest}.data-00000-of-00001 is unreadable (Read less bytes than requested)" in resumed.stderr
    assert f"Resuming from {older}: 2 epochs done" in resumed.stderr
    results = json.loads((model_dir / "results.json").read_text())
    assert len(results["history"]["loss"]) == 4 and all(map(math.isfinite, results["history"]["loss"]))
    assert 0.0 <= results["metrics"]["recall@1"] <= 1.0

    for index in checkpoints.glob("ckpt-*.index"):
        index.write_bytes(b"")
    failed = run_module("pnpp_tf.train", *common, "--epochs=4")
    assert failed.returncode == 2, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("pnpp_tf.train: error:")]
    assert len(errors) == 1 and f"{checkpoints}: no intact checkpoint to resume from" in errors[0]
    assert f"move {checkpoints} away to start the run afresh" in errors[0]
    assert "Traceback" not in failed.stderr
