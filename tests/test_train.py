"""`python -m pnpp_tf.train` end to end on tiny folder datasets, and its one-line errors."""

import json
import math
import os
import re
import shutil

import pytest
from PIL import Image

from cli_helpers import TINY_RUN, run_module
from conftest import make_folder_dataset
from pnpp_tf import plots

pytestmark = pytest.mark.slow  # end-to-end runs of the programs


TINY_FOLDER_RUN = ("--dataset=folder", "--eval_ks=1,2", *TINY_RUN)


def run_train(*args):
    return run_module("pnpp_tf.train", *args)


def test_trains_end_to_end_and_writes_results(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")
    model_dir = tmp_path / "run"
    result = run_train(*TINY_FOLDER_RUN, f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--eval_every=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sharding callback duration" not in result.stderr  # TensorFlow's INFO line at each checkpoint

    results = json.loads((model_dir / "results.json").read_text())
    for section in ("metrics", "before_training"):
        assert set(results[section]) >= {"recall@1", "recall@2", "map@r", "r_precision", "nmi"}
        assert 0.0 <= results[section]["recall@1"] <= 1.0
    assert results["flags"]["batch_size"] == 8 and results["dataset"] == "folder"
    assert len(results["history"]["loss"]) == 3  # 1 warm-up + 2 training epochs
    assert len(results["history"]["test_recall@1"]) == 3
    assert results["history"]["proxy_lr"] == [10.0] * 3
    # The final metrics are the last epoch's measurement (with NMI), not a second embedding.
    assert results["metrics"]["recall@1"] == results["history"]["test_recall@1"][-1]
    assert results["metrics"]["map@r"] == results["history"]["test_map@r"][-1]
    timings = results["timings"]
    assert timings["train_seconds"] > 0 and timings["final_eval_seconds"] > 0
    assert timings["wall_seconds"] >= timings["train_seconds"] + timings["epoch_eval_seconds"] + timings["final_eval_seconds"]
    assert (model_dir / "embedder.keras").is_file()
    assert (model_dir / "checkpoints" / "checkpoint").is_file()  # the index of the resumable checkpoints
    assert any((model_dir / "logs").rglob("*.v2"))
    assert Image.open(model_dir / "curves.png").size == plots.CURVES_SIZE


def test_query_gallery_layout_read_through_an_image_cache(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", eval_dirs=("query", "gallery"))
    model_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    result = run_train(*TINY_FOLDER_RUN, "--epochs=1", "--warmup_epochs=0", "--eval_every=0",
                       f"--data_dir={data_dir}", f"--model_dir={model_dir}", f"--cache_dir={cache_dir}",
                       "--cache_short_side=20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: decoded 16 images" in result.stderr  # once: the start-up check fills the cache
    metrics = json.loads((model_dir / "results.json").read_text())["metrics"]
    assert metrics["num_queries"] == 3 * 4
    # Every image of every split was decoded into the cache once: 4 x 4 train, 3 x 4 query and gallery.
    assert len(list(cache_dir.rglob("*.tensor"))) == 4 * 4 + 2 * 3 * 4

    # Training images at --cache_short_side, evaluation images at the side evaluation resizes to.
    again = run_train(*TINY_FOLDER_RUN, "--epochs=1", "--warmup_epochs=0", "--eval_every=0",
                      f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'again'}", f"--cache_dir={cache_dir}",
                      "--cache_short_side=20")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train: decoded 0 images" in again.stderr and "gallery: decoded 0 images" in again.stderr
    assert len(list(cache_dir.rglob("*.tensor"))) == 4 * 4 + 2 * 3 * 4


def break_empty_class(data_dir):
    os.makedirs(os.path.join(data_dir, "train", "empty_class"))
    return "empty_class has no images"


def break_unreadable_image(data_dir):
    with open(os.path.join(data_dir, "test", "test_class_01", "broken.jpg"), "wb") as file:
        file.write(b"this is not a jpeg")
    return r"1 unreadable image\(s\) in test: .*broken.jpg \(Unknown image file format.*--on_bad_image=skip"


def break_overlap(data_dir):
    shutil.copytree(os.path.join(data_dir, "train", "train_class_00"),
                    os.path.join(data_dir, "test", "train_class_00"))
    return "train_class_00.*disjoint"


def break_weights_file(data_dir):
    with open(os.path.join(os.path.dirname(data_dir), "random.weights.h5"), "wb") as file:
        file.write(os.urandom(4096))
    return (r"--weights=.*random.weights.h5: cannot load this file into backbone 'small_cnn' \(Unable to .*"
            r"file signature not found\)\); pass a weights file saved from this backbone, or --weights=none")


def break_data_dir(data_dir):
    shutil.rmtree(data_dir)
    return "--data_dir=.* does not exist"


@pytest.mark.parametrize("breaker, extra", [
    (break_data_dir, []),
    (break_empty_class, []),
    (break_unreadable_image, []),
    (break_unreadable_image, ["--cache_dir={tmp}/cache"]),  # the check that fills the cache
    (break_overlap, []),
    (break_weights_file, ["--weights={tmp}/random.weights.h5"]),
    (lambda d: "--batch_size=10 is not divisible by --classes_per_batch=4", ["--batch_size=10", "--classes_per_batch=4"]),
])
def test_bad_input_gives_a_one_line_error(tmp_path, breaker, extra):
    data_dir = make_folder_dataset(tmp_path / "data")
    pattern = breaker(data_dir)
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    result = run_train(*TINY_FOLDER_RUN, *extra, f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("pnpp_tf.train: error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_resuming_refuses_a_damaged_results_json_and_fewer_epochs_naming_them(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")
    model_dir = tmp_path / "run"
    args = (*TINY_FOLDER_RUN, f"--data_dir={data_dir}", f"--model_dir={model_dir}")
    assert run_train(*args).returncode == 0
    results = model_dir / "results.json"
    text = results.read_text()

    def one_line_error(*extra):
        result = run_train(*args, *extra)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("pnpp_tf.train: error:")]
        assert len(errors) == 1, result.stderr[-3000:]
        return errors[0]

    results.write_text(text[: len(text) // 2])  # a copy cut short
    assert one_line_error().startswith(f"pnpp_tf.train: error: {results}: this results.json of a training run "
                                       "is not valid JSON (")
    results.write_text("[1]")
    assert one_line_error() == (f"pnpp_tf.train: error: {results}: this results.json of a training run holds a "
                                "JSON list, not an object; restore or delete it.")
    results.unlink()  # as if killed after the last checkpoint, before results.json
    assert one_line_error("--epochs=1") == (
        f"pnpp_tf.train: error: --epochs=1: the run in --model_dir={model_dir} has already trained 2 main "
        "epochs (after 1 of warm-up); --epochs may only grow when resuming. Pass --epochs=2 or more, or choose "
        "another --model_dir.")
    assert not results.exists()


def test_the_gpu_switches_train_on_a_cpu_too(tmp_path):
    # What a GPU user turns on: XLA, half precision, several steps per execution.
    data_dir = make_folder_dataset(tmp_path / "data")
    model_dir = tmp_path / "run"
    result = run_train(*TINY_FOLDER_RUN, f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--jit_compile=true",
                       "--mixed_precision=mixed_bfloat16", "--steps_per_execution=2", "--eval_every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "XLA for the train step: True (--jit_compile=true)" in result.stderr
    results = json.loads((model_dir / "results.json").read_text())
    assert len(results["history"]["loss"]) == 3 and all(map(math.isfinite, results["history"]["loss"]))
    assert results["eval_every"] == 0 and 0.0 <= results["metrics"]["recall@1"] <= 1.0
