"""Data that changes under a run: before a resume (named, refused or accepted) and mid-run (named,
then stopped on or skipped), each in a real training process."""

import json
import os
import pathlib
import shutil

import pytest

from cli_helpers import REPO, TINY_RUN, run_module, run_python
from conftest import make_folder_dataset
from pnpp_tf.data import pipeline
from pnpp_tf.data.folder import read_folder_dataset

RUN = (*TINY_RUN, "--dataset=folder", "--eval_ks=1", "--eval_every=0", "--warmup_epochs=1")


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A dataset and a run of 1 warm-up + 1 epoch on it, which --epochs=2 resumes."""
    root = tmp_path_factory.mktemp("checkpointed")
    data_dir = make_folder_dataset(root / "data", train_classes=4, images_per_class=4)
    result = run_module("pnpp_tf.train", *RUN, "--epochs=1", f"--data_dir={data_dir}", f"--model_dir={root / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _copy(checkpointed, tmp_path):
    """A copy of the dataset (modification times kept) and of the run, to change one of."""
    shutil.copytree(checkpointed / "data", tmp_path / "data")
    shutil.copytree(checkpointed / "run", tmp_path / "run")
    return tmp_path / "data", tmp_path / "run"


def _resume(data_dir, model_dir, *extra):
    return run_module("pnpp_tf.train", *RUN, "--epochs=2", f"--data_dir={data_dir}", f"--model_dir={model_dir}", *extra)


def _one_line_error(result):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("pnpp_tf.train: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _add_class(data):
    shutil.copytree(data / "train" / "train_class_00", data / "train" / "train_class_09")


def _remove_class(data):
    shutil.rmtree(data / "train" / "train_class_03")


def _rename_class(data):
    os.rename(data / "train" / "train_class_01", data / "train" / "train_class_11")


@pytest.mark.slow
@pytest.mark.parametrize("change, expected", [
    (_add_class, "train: 1 class added (train_class_09), 4 files added (train/train_class_09/img_0.png"),
    (_remove_class, "train: 1 class removed (train_class_03), 4 files removed (train/train_class_03/img_0.png"),
    (_rename_class, "train: 1 class renamed (train_class_01 -> train_class_11)"),
])
def test_other_classes_are_never_resumed(checkpointed, tmp_path, change, expected):
    data_dir, model_dir = _copy(checkpointed, tmp_path)
    change(data_dir)
    line = _one_line_error(_resume(data_dir, model_dir, "--accept_data_change"))  # refused all the same
    assert expected in line and "cannot resume on other classes" in line, line


@pytest.mark.slow
def test_changed_files_resume_only_when_accepted(checkpointed, tmp_path):
    data_dir, model_dir = _copy(checkpointed, tmp_path)
    with open(data_dir / "train" / "train_class_02" / "img_0.png", "ab") as file:
        file.write(b"appended")  # the PNG still decodes: a change, not a bad image
    os.remove(data_dir / "test" / "test_class_01" / "img_1.jpg")
    line = _one_line_error(_resume(data_dir, model_dir))
    assert ("test: 1 file removed (test/test_class_01/img_1.jpg); train: 1 file modified "
            "(train/train_class_02/img_0.png)); restore the files, or rerun with --accept_data_change") in line, line

    accepted = _resume(data_dir, model_dir, "--accept_data_change")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "Resuming on changed data (--accept_data_change)" in accepted.stderr
    results = json.loads((model_dir / "results.json").read_text())
    assert results["metrics"]["num_queries"] == 11 and len(results["history"]["loss"]) == 3


def _read_in_epoch(data_dir, epoch):
    """A training image that the (Keras-numbered) `epoch` of RUN reads: later than the pipeline
    can have read ahead when an earlier epoch ends."""
    train = read_folder_dataset(str(data_dir))["train"]
    sampler = pipeline.make_sampler("balanced", train.labels, batch_size=8, classes_per_batch=2)
    return train.paths[int(sampler.epoch_batches(epoch)[-1, -1])]


def _changing(data_dir, model_dir, *extra, after_epoch=1, **changes):
    env = dict(os.environ, PNPP_CHANGE_AFTER_EPOCH=str(after_epoch),
               **{f"PNPP_{what.upper()}": os.pathsep.join(map(str, paths)) for what, paths in changes.items()})
    return run_python(str(REPO / "tests" / "changing_data_train.py"), *RUN, "--epochs=3", f"--data_dir={data_dir}",
                      f"--model_dir={model_dir}", *extra, env=env)


@pytest.fixture
def data_dir(tmp_path):
    return pathlib.Path(make_folder_dataset(tmp_path / "data", train_classes=4, images_per_class=4))


@pytest.mark.slow
def test_a_training_image_deleted_mid_run_stops_the_run_naming_it(data_dir, tmp_path):
    # Read in the first main epoch, right after the change: the warm-up's checkpoint is the last.
    image = _read_in_epoch(data_dir, epoch=1)
    result = _changing(data_dir, tmp_path / "run", delete=[image])
    line = _one_line_error(result)
    assert "1 image(s) stopped reading during training (epoch " in line and f"{image} (file not found)" in line
    assert "the last checkpoint, " in line and "ckpt-2" in line and "--on_bad_image=skip" in line, line
    assert (tmp_path / "run" / "checkpoints" / "ckpt-2.index").exists()
    assert not (tmp_path / "run" / "results.json").exists()
    # What the line says to do resumes the run.
    resumed = run_module("pnpp_tf.train", *RUN, "--epochs=3", f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'run'}",
                         "--on_bad_image=skip", "--accept_data_change")
    assert resumed.returncode == 0 and "Resuming from" in resumed.stderr, resumed.stderr[-3000:]
    assert "train: 1 file removed (train/" in resumed.stderr  # the folder reader no longer lists it
    assert len(json.loads((tmp_path / "run" / "results.json").read_text())["history"]["loss"]) == 4


@pytest.mark.slow
def test_a_training_image_deleted_mid_run_is_skipped_and_reported(data_dir, tmp_path):
    image = _read_in_epoch(data_dir, epoch=3)
    result = _changing(data_dir, tmp_path / "run", "--on_bad_image=skip", delete=[image])
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["skipped_images"] == {"train": [image]}
    assert results["skipped_during_run"] == [{"split": "train", "path": image, "reason": "file not found"}]
    assert len(results["history"]["loss"]) == 4


@pytest.mark.slow
def test_an_evaluation_image_emptied_mid_run_is_named(data_dir, tmp_path):
    image = str(data_dir / "test" / "test_class_02" / "img_3.png")
    result = _changing(data_dir, tmp_path / "run", "--eval_every=1", empty=[image])
    line = _one_line_error(result)
    assert "stopped reading during evaluation" in line and f"{image} (empty file)" in line, line
    skipped = _changing(data_dir, tmp_path / "skipping", "--eval_every=1", "--on_bad_image=skip", empty=[image])
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    results = json.loads((tmp_path / "skipping" / "results.json").read_text())
    assert results["skipped_images"] == {"test": [image]} and results["metrics"]["num_queries"] == 11


@pytest.mark.slow
def test_cache_entries_damaged_or_gone_mid_run_are_rebuilt(data_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    first = run_module("pnpp_tf.train", *RUN, "--epochs=1", f"--data_dir={data_dir}",
                       f"--model_dir={tmp_path / 'warm'}", f"--cache_dir={cache_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    entries = sorted(str(p) for p in cache_dir.rglob(f"*{pipeline.CACHED_IMAGE_SUFFIX}"))
    garbled = _changing(data_dir, tmp_path / "garbled", f"--cache_dir={cache_dir}", garble=entries)
    assert garbled.returncode == 0, garbled.stderr[-3000:]
    assert "rebuilding it" in garbled.stderr
    vanished = _changing(data_dir, tmp_path / "vanished", f"--cache_dir={cache_dir}", delete=[cache_dir])
    assert vanished.returncode == 0, vanished.stderr[-3000:]
    assert cache_dir.is_dir()


def test_a_checkpoint_from_before_fingerprints_is_resumed_with_a_warning(tmp_path, caplog):
    from pnpp_tf import train  # pylint: disable=import-outside-toplevel
    from pnpp_tf.config import TrainConfig  # pylint: disable=import-outside-toplevel
    from pnpp_tf.data.fingerprint import DataFingerprint  # pylint: disable=import-outside-toplevel

    data_dir = make_folder_dataset(tmp_path / "data")
    config = TrainConfig(dataset="folder", data_dir=data_dir, model_dir=str(tmp_path / "run"))
    fingerprint = DataFingerprint.of_splits(read_folder_dataset(data_dir), data_dir)
    with caplog.at_level("WARNING"):
        train._check_data_unchanged(config, {}, fingerprint)  # a fresh start: nothing to say
        assert not caplog.records
        train._check_data_unchanged(config, {"finished_epochs": 1, "flags": {}}, fingerprint)
    assert "checkpointed before runs recorded their data" in caplog.text
