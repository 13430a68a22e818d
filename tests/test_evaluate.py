"""`python -m pnpp_tf.evaluate` on Keras and SavedModel embedders, its errors, and the benchmark."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_folder_dataset
from pnpp_tf import evaluate
from pnpp_tf.retrieval.metrics import nmi, retrieval_metrics
from pnpp_tf.config import EvaluateConfig
from pnpp_tf.data import load_splits, pipeline
from pnpp_tf.modeling.model import build_embedder

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(*args):
    """Runs `python args...` from the repository; returns the CompletedProcess."""
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=python_path)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def config(**overrides):
    """The evaluate() config of a small folder dataset, with `overrides`."""
    return EvaluateConfig(**{"dataset": "folder", "eval_batch_size": 8, "verbose": 0, **overrides})


def embed(function, split, image_size):
    """Embeds a split outside the CLI, as the reference for its metrics."""
    batches = pipeline.eval_dataset(split.paths, image_size, batch_size=5)
    return np.concatenate([np.asarray(function(images)) for images in batches])


class ColourStatistics(tf.Module):
    """A stand-in for an exported embedder: the serving contract, images in, `embedding` out."""

    def __init__(self, image_size):
        super().__init__()
        self.projection = tf.Variable(
            np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
        signature = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")
        self.serve = tf.function(self._serve, input_signature=[signature])

    def _serve(self, images):
        stats = tf.concat([tf.reduce_mean(images, [1, 2]), tf.math.reduce_std(images, [1, 2])], 1)
        return {"embedding": tf.math.l2_normalize(stats @ self.projection, axis=1)}


@pytest.mark.slow
def test_keras_model_end_to_end(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", test_classes=3, images_per_class=5)
    model_dir = tmp_path / "run"
    embedder = build_embedder("small_cnn", image_size=32, embedding_dim=8, weights="none")
    model_dir.mkdir()
    embedder.save(model_dir / "embedder.keras")

    result = run("-m", "pnpp_tf.evaluate", f"--model_dir={model_dir}", "--dataset=folder",
                 f"--data_dir={data_dir}", "--eval_ks=1,4", "--eval_batch_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "15/15" in result.stdout  # the progress bar while embedding, in images

    saved = json.loads((model_dir / "eval_folder.json").read_text())
    # The image size came from the model (the --image_size default is 256).
    assert saved["image_size"] == 32 and saved["model_format"] == "keras"
    test = load_splits("folder", data_dir)["test"]
    want = retrieval_metrics(embed(embedder, test, 32), test.labels, ks=(1, 4))
    for name, value in want.items():
        assert saved["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert 0.0 <= saved["metrics"]["nmi"] <= 1.0  # the folder protocol reports NMI
    table = (model_dir / "eval_folder.md").read_text()
    assert "| Recall@1 | Recall@4 | MAP@R | R-Precision | NMI |" in table
    assert f"| {100 * want['recall@1']:.2f} |" in table


@pytest.mark.parametrize("backend", ["tf", pytest.param("faiss", marks=pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss is not installed"))])
def test_saved_model_query_gallery(tmp_path, backend):
    data_dir = make_folder_dataset(tmp_path / "data", test_classes=3, images_per_class=4,
                                   eval_dirs=("query", "gallery"))
    module = ColourStatistics(image_size=40)
    # TF Serving's layout: the base path holds numbered versions; the newest is evaluated.
    tf.saved_model.save(module, str(tmp_path / "export" / "1"),
                        signatures={"serving_default": module.serve})
    tf.saved_model.save(module, str(tmp_path / "export" / "2"),
                        signatures={"serving_default": module.serve})

    results = evaluate.evaluate(config(saved_model=str(tmp_path / "export"), data_dir=data_dir,
                                       output_dir=str(tmp_path / "out"), backend=backend))
    assert results["model"] == str(tmp_path / "export" / "2")
    assert results["image_size"] == 40 and results["num_gallery_images"] == 12
    splits = load_splits("folder", data_dir)
    query = embed(lambda x: module.serve(x)["embedding"], splits["query"], 40)
    gallery = embed(lambda x: module.serve(x)["embedding"], splits["gallery"], 40)
    want = retrieval_metrics(query, splits["query"].labels, gallery,
                                        splits["gallery"].labels, ks=(1, 2, 4, 8))
    for name, value in want.items():
        assert results["metrics"][name] == pytest.approx(value, abs=1e-6), name
    on_disk = json.loads((tmp_path / "out" / "eval_folder.json").read_text())
    assert on_disk["metrics"]["recall@1"] == results["metrics"]["recall@1"]
    assert "queries searched in a gallery of 12" in (tmp_path / "out" / "eval_folder.md").read_text()


def test_calibrate_writes_thresholds_and_their_roc(tmp_path):
    from PIL import Image  # pylint: disable=import-outside-toplevel

    from pnpp_tf.plots import ROC_SIZE  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval import calibration  # pylint: disable=import-outside-toplevel

    data_dir = make_folder_dataset(tmp_path / "data", test_classes=4, images_per_class=5)
    module = ColourStatistics(image_size=24)
    tf.saved_model.save(module, str(tmp_path / "export"), signatures={"serving_default": module.serve})
    results = evaluate.evaluate(config(saved_model=str(tmp_path / "export"), data_dir=data_dir,
                                       output_dir=str(tmp_path / "out"), calibrate=True,
                                       false_accept_rates=("0.1", "0.01")))
    test = load_splits("folder", data_dir)["test"]
    want = calibration.calibrate(embed(lambda x: module.serve(x)["embedding"], test, 24), test.labels,
                                 false_accept_rates=(0.1, 0.01))
    found = results["calibration"]
    assert (found["same_class_pairs"], found["other_class_pairs"]) == (4 * 10, 190 - 40)
    for row, expected in zip(found["false_accept_rates"], want["false_accept_rates"]):
        assert row["false_accept_rate"] == expected["false_accept_rate"]
        # Embedded in other batches, a similarity may move by rounding: by a bin at most.
        assert row["threshold"] == pytest.approx(expected["threshold"], abs=2.0 / calibration.BINS_PER_UNIT)
    on_disk = json.loads((tmp_path / "out" / "eval_folder.json").read_text())
    assert on_disk["calibration"]["best_f1"] == pytest.approx(found["best_f1"])
    with Image.open(on_disk["roc_png"]) as image:
        assert image.size == ROC_SIZE
    table = (tmp_path / "out" / "eval_folder.md").read_text()
    assert "### Match thresholds" in table and f"| 0.1 | {found['false_accept_rates'][0]['threshold']:.5f} |" in table


def saved_model_without_embedding(path):
    module = tf.Module()
    module.serve = tf.function(lambda images: {"features": tf.reduce_mean(images, [1, 2])},
                               input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return str(path)


@pytest.mark.parametrize("settings, pattern", [
    (lambda tmp: dict(model_dir=str(tmp)), r"--model_dir=.* has no embedder.keras"),
    (lambda tmp: dict(saved_model=str(tmp)), r"--saved_model=.* is not a SavedModel"),
    (lambda tmp: dict(saved_model=saved_model_without_embedding(tmp / "sm")),
     r"no output named 'embedding' \(it has \['features'\]\)"),
    (lambda tmp: dict(saved_model=str(tmp), output_dir=None), r"--output_dir .* is required"),
    (lambda tmp: dict(model_dir=str(tmp), eval_ks=["1", "x"]), r"--eval_ks .* got 1,x"),
    (lambda tmp: dict(model_dir=str(tmp), block_size=-1), r"--block_size=-1: must be at least 0"),
    (lambda tmp: dict(model_dir=str(tmp), false_accept_rates=["0.01", "1"]),
     r"--false_accept_rates must be numbers between 0 and 1, got 0.01,1"),
])
def test_bad_settings_raise_a_named_value_error(tmp_path, settings, pattern):
    values = dict(output_dir=str(tmp_path / "out"), data_dir=str(tmp_path))
    values.update(settings(tmp_path))
    with pytest.raises(ValueError, match=pattern):
        evaluate.evaluate(config(**values))


@pytest.mark.slow
def test_missing_model_is_a_one_line_error(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")
    result = run("-m", "pnpp_tf.evaluate", f"--model_dir={tmp_path / 'nothing'}",
                 "--dataset=folder", f"--data_dir={data_dir}")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("pnpp_tf.evaluate: error:")]
    assert len(errors) == 1 and "has no embedder.keras" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_benchmark_quick_prints_a_table():
    result = run("tools/bench_eval.py", "--quick", "--configs=inshop_quick", "--backends=tf,faiss,calibrate")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| In-Shop-like")]
    assert [row.split("|")[3].strip() for row in rows] == ["tf", "faiss", "calibrate"]
    assert re.search(r"\| tf \| [\d.]+ \| [\d.e-]+ \(\d+ GFLOP/s\) \| [\d.]+ \| [\d.]+ \| \d+ MB", rows[0])
    assert rows[1].endswith("| 0 |  |") or "faiss not installed" in rows[1]
    cells = [cell.strip() for cell in rows[2].split("|")]
    # The nearest neighbour's share of matches is Recall@1; the TAR is a rate.
    assert cells[10] == [cell.strip() for cell in rows[0].split("|")][10] and 0 < float(cells[13]) <= 1


def test_euclidean_evaluates_the_raw_embedding_and_says_so(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", test_classes=3, images_per_class=4)
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    embedder = build_embedder("small_cnn", image_size=32, embedding_dim=8, weights="none")
    embedder.save(model_dir / "embedder.keras")
    results = evaluate.evaluate(config(model_dir=str(model_dir), data_dir=data_dir, eval_ks=[1, 2],
                                       eval_distance="euclidean"))
    test = load_splits("folder", data_dir)["test"]
    raw = embed(lambda images: embedder(images, training=False), test, 32)
    want = retrieval_metrics(raw, test.labels, ks=(1, 2), distance="euclidean")
    want["nmi"] = nmi(raw, test.labels, distance="euclidean")
    for name, value in want.items():
        assert results["metrics"][name] == pytest.approx(value, abs=1e-6), name
    on_disk = json.loads((model_dir / "eval_folder.json").read_text())
    assert on_disk["eval_distance"] == "euclidean"
    assert "Euclidean distance of the raw embeddings" in (model_dir / "eval_folder.md").read_text()
    assert evaluate.evaluate(config(model_dir=str(model_dir), data_dir=data_dir,
                                    eval_ks=[1, 2]))["eval_distance"] == "cosine"


def test_euclidean_refuses_an_export_whose_output_is_normalised(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", test_classes=3, images_per_class=4)
    module = ColourStatistics(image_size=40)
    tf.saved_model.save(module, str(tmp_path / "export"), signatures={"serving_default": module.serve})
    with pytest.raises(ValueError, match="--eval_distance=euclidean needs the raw embedding"):
        evaluate.evaluate(config(saved_model=str(tmp_path / "export"), data_dir=data_dir,
                                 output_dir=str(tmp_path / "out"), eval_distance="euclidean"))
