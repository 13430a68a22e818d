"""tools/bench_train.py and tools/bench_input.py at tiny sizes, and the train step under XLA on CPU."""

import json
import re

import pytest

import keras
import numpy as np
import tensorflow as tf

from cli_helpers import REPO, run_python
from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder
from pnpp_tf.modeling.optimizers import TorchAdam

pytestmark = pytest.mark.slow  # end-to-end runs of the programs


NUMBER = r"(\d+(?:\.\d+)?)"


def table_rows(stdout):
    """The data rows of the Markdown table in stdout, as lists of cell strings."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3 and set(lines[1]) <= set("|-"), stdout
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_bench_train_prints_both_xla_rows_and_writes_json(tmp_path):
    output = tmp_path / "train.json"
    result = run_python(
        str(REPO / "tools" / "bench_train.py"), "--backbone=small_cnn", "--image_size=32", "--batch_size=8",
        "--classes_per_batch=2", "--embedding_dim=16", "--num_classes=4", "--steps=2", "--warmup_steps=1",
        "--jit_compile=both", f"--json={output}", timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows(result.stdout)
    assert [row[:6] for row in rows] == [["pnpp_tf", "small_cnn", "32", "8", "none", "off"],
                                         ["pnpp_tf", "small_cnn", "32", "8", "none", "on"]]
    for row in rows:
        assert float(row[6]) > 0 and float(row[7]) > 0  # median step ms, images/s
    assert re.search(r"Machine: .+, \d+ cores .*TensorFlow 2\.", result.stdout)

    report = json.loads(output.read_text())
    assert report["machine"]["tensorflow"] == tf.__version__ and report["machine"]["cores"] >= 1
    assert [row["jit_compile"] for row in report["rows"]] == [False, True]
    for row in report["rows"]:
        assert len(row["step_seconds"]) == 2 and all(s > 0 for s in row["step_seconds"])
        assert abs(row["images_per_second"] - 8 / (row["median_step_ms"] / 1e3)) < 1e-6
        assert np.isfinite(row["final_loss"])


def test_bench_input_times_train_and_eval_pipelines_per_core(tmp_path):
    output = tmp_path / "input.json"
    result = run_python(
        str(REPO / "tools" / "bench_input.py"), "--num_images=20", "--long_side=64", "--image_size=32",
        "--batch_size=8", "--classes_per_batch=2", "--warmup_batches=1", "--batches=2", "--repeats=2",
        "--cores=1,all", f"--json={output}", timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows(result.stdout)
    labels = ["train", "eval", "train from --cache_dir", "eval from --cache_dir"]
    assert [row[0].split(" (")[0] for row in rows] == labels * 2
    assert [row[1] for row in rows[:4]] == ["1"] * 4
    for row in rows:
        assert all(float(cell) > 0 for cell in row[2:6]) and float(row[6]) >= 0, row  # cores busy may round to 0
    assert re.search(r"Data: 20 generated JPEG files .* 20 files", result.stdout)
    assert re.search(r"Cache: shorter side 36 px, \d+\.\d MB on disk, built in", result.stdout)

    report = json.loads(output.read_text())
    assert report["data"]["files"] == 20 and report["data"]["mean_kilobytes"] > 0
    one_core = [row for row in report["rows"] if row["cores"] == 1]
    assert len(one_core) == 4 and all(len(row["cpus"]) == 1 for row in one_core)  # really pinned
    assert report["data"]["cache"]["short_side"] == 36 and report["data"]["cache"]["megabytes"] > 0
    for row in report["rows"]:
        assert row["images_per_second"] > 0
        assert abs(row["images_per_second_per_core"] * row["cores"] - row["images_per_second"]) < 1e-6
        assert all(window["images"] == 2 * 8 for window in row["windows"])


def test_bench_loop_splits_a_real_runs_time_and_writes_json(tmp_path):
    output = tmp_path / "loop.json"
    result = run_python(
        str(REPO / "tools" / "bench_loop.py"), "--backbone=small_cnn", "--image_size=32", "--embedding_dim=16",
        "--train_images=40", "--images_per_class=4", "--batch_size=8", "--classes_per_batch=2", "--epochs=2",
        "--eval_every=1", f"--work_dir={tmp_path / 'work'}", f"--json={output}", timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = table_rows(result.stdout)
    assert row[:5] == ["small_cnn", "32", "8", "3", "1"]
    assert re.search(r"Machine: .+, \d+ cores .*TensorFlow 2\.", result.stdout)

    (measured,) = json.loads(output.read_text())["rows"]
    assert (measured["train_images"], measured["test_images"], measured["train_classes"]) == (40, 41, 10)
    shares = measured["shares"]
    assert abs(sum(shares.values()) - 1.0) < 1e-9 and min(shares.values()) >= 0.0
    assert shares["epoch_eval"] > 0 and shares["checkpoint"] > 0  # measured every epoch, saved every epoch
    assert abs(measured["loop_overhead_share"] - (1.0 - shares["train"])) < 1e-9
    assert measured["process_seconds"] > measured["timings"]["wall_seconds"] > measured["timings"]["train_seconds"]


def test_xla_train_step_compiles_on_cpu_and_matches_the_unjitted_step():
    """Two train steps with jit_compile=True (which fails on any op XLA rejects) update every weight
    as the plain step does.

    Run in float64 (the loss itself stays float32): in float32 the two paths' round-off (~1e-6)
    now and then flips a ReLU or max-pool decision, which changes a weight's update by up to ~1e-2
    of its size; in float64 the decisions agree, and the updates match to ~1e-5 of their size, the
    float32 round-off of the loss. The float32 step compiles in the bench_train test above.
    """
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32))
    labels = tf.constant(np.repeat(np.arange(4), 2).astype(np.int32))

    def train(jit_compile):
        keras.utils.set_random_seed(0)
        model = ProxyNCAModel(build_embedder("small_cnn", image_size=32, embedding_dim=16), num_classes=4)
        model.compile(optimizer=TorchAdam(1e-2), proxy_optimizer=TorchAdam(10.0), clip_value=10.0,
                      jit_compile=jit_compile)
        assert model.jit_compile is jit_compile  # Keras did not quietly turn XLA off
        before = [v.numpy().copy() for v in model.weights]
        losses = [model.train_on_batch(images, labels, return_dict=True)["loss"] for _ in range(2)]
        return before, [v.numpy() for v in model.weights], losses, [v.path for v in model.weights]

    keras.config.set_dtype_policy("float64")
    try:
        before, plain_after, plain_losses, names = train(False)
        before_xla, xla_after, xla_losses, xla_names = train(True)
    finally:
        keras.config.set_dtype_policy("float32")
    assert names == xla_names and len(names) > 40
    np.testing.assert_allclose(xla_losses, plain_losses, rtol=1e-5)
    for name, start, start_xla, plain, xla in zip(names, before, before_xla, plain_after, xla_after):
        np.testing.assert_array_equal(start, start_xla, err_msg=name)
        step = plain - start
        scale = float(np.abs(step).max())
        assert scale > 0, f"{name} did not move"  # kernels, BatchNorm statistics and proxies all move
        np.testing.assert_allclose(xla - start, step, rtol=0, atol=1e-4 * scale, err_msg=name)
