"""--max_pixels: a valid 20000 x 20000 PNG (76 KB) in the data is refused from its header, by
check_data, the pipelines, evaluate, index and training, and peak memory stays bounded.

Decoding it would take 20000² x 3 bytes (uint8) and then 20000² x 12 (the float32 copy): 6 GB on
top of TensorFlow. The bound asserted is the same command's peak on the same data without the
bomb, plus what one image within the budget may cost (DECODED_BYTES_PER_PIXEL x max_pixels).
"""

import json
import os

import pytest

from cli_helpers import TINY_RUN, run_module, run_python
from conftest import make_folder_dataset
from pixel_bombs import run_measured, write_png
from pnpp_tf.data.image_header import DECODED_BYTES_PER_PIXEL, DEFAULT_MAX_PIXELS
from pnpp_tf.modeling.model import build_embedder

SIDE = 20000
OVER = f"{SIDE}x{SIDE} = {SIDE * SIDE} pixels, more than max_pixels={DEFAULT_MAX_PIXELS}"
# What decoding one image within the default budget may add to a process's peak.
BUDGET_BYTES = DECODED_BYTES_PER_PIXEL * DEFAULT_MAX_PIXELS


def bomb_in(directory):
    os.makedirs(directory, exist_ok=True)
    return write_png(os.path.join(directory, "bomb.png"), SIDE, SIDE)


@pytest.mark.slow
def test_check_data_reports_the_bomb_undecoded(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")
    args = ("-m", "pnpp_tf.check_data", "--dataset=folder", f"--data_dir={data_dir}",
            f"--json={tmp_path / 'report.json'}")
    clean, baseline = run_measured(*args)
    assert clean.returncode == 0, clean.stderr[-2000:]
    bomb = bomb_in(tmp_path / "data" / "train" / "train_class_01")

    result, peak = run_measured(*args)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"train: {bomb} is too large: {OVER}" in result.stdout
    assert "| train | 17 | 4 | 0 | 1 |" in result.stdout  # undecodable 0, over --max_pixels 1
    assert "Problems found: shrink or remove the images over --max_pixels" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and report["max_pixels"] == DEFAULT_MAX_PIXELS
    assert report["splits"]["train"]["over_max_pixels"] == [[bomb, OVER]]
    assert peak < baseline + BUDGET_BYTES, (peak, baseline)


# Bypasses the start-up check, as a file replaced mid-run would: the pipelines read the bomb.
_PIPELINES = """
import json, resource, sys
import numpy as np, tensorflow as tf
from pnpp_tf.data import pipeline
small, bomb = sys.argv[1:3]
sampler = pipeline.RandomSampler(2, 2)
def datasets(second):
    yield "eval", pipeline.eval_dataset([small, second], 32, batch_size=2)
    yield "train", pipeline.train_dataset([small, second], np.array([0, 1]), sampler, 32, epochs=1)
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
for _, dataset in datasets(small):  # warm up: the same pipelines, threads and buffers
    list(dataset)
report = {"before": peak(), "errors": {}}
for name, dataset in datasets(bomb):
    try:
        list(dataset)
    except tf.errors.InvalidArgumentError as error:
        report["errors"][name] = error.message
report["after"] = peak()
print(json.dumps(report))
"""


@pytest.mark.slow
def test_the_pipelines_refuse_the_bomb_even_past_the_start_up_check(tmp_path):
    small = write_png(tmp_path / "small.png", 40, 30)
    bomb = bomb_in(tmp_path)
    result = run_python("-c", _PIPELINES, small, bomb)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    for name in ("eval", "train"):
        assert f"{bomb} is {OVER}" in report["errors"][name], name
    assert report["after"] < report["before"] + BUDGET_BYTES, report


@pytest.mark.slow
def test_evaluate_refuses_the_bomb_or_skips_it(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", images_per_class=3)
    bomb = bomb_in(tmp_path / "data" / "test" / "test_class_00")
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    build_embedder("small_cnn", image_size=32, embedding_dim=8, weights="none").save(model_dir / "embedder.keras")
    args = ("-m", "pnpp_tf.evaluate", f"--model_dir={model_dir}", "--dataset=folder", f"--data_dir={data_dir}",
            "--eval_ks=1", "--verbose=0")

    refused = run_module(*args[1:])
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("pnpp_tf.evaluate: error:")]
    assert len(errors) == 1 and f"1 too large image(s) in test: {bomb} ({OVER})" in errors[0], refused.stderr[-2000:]
    assert "--on_bad_image=skip" in errors[0] and "Traceback" not in refused.stderr
    assert not (model_dir / "eval_folder.json").exists()

    skipped = run_module(*args[1:], "--on_bad_image=skip")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert f"Skipping image {bomb}, over --max_pixels ({OVER})" in skipped.stderr
    results = json.loads((model_dir / "eval_folder.json").read_text())
    assert results["skipped_images"] == {"test": [bomb]} and results["num_query_images"] == 9


@pytest.mark.slow
def test_index_skips_the_bomb_and_loops_of_links(tmp_path):
    photos = tmp_path / "photos"
    make_folder_dataset(photos, train_classes=1, test_classes=1, images_per_class=2)
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    build_embedder("small_cnn", image_size=32, embedding_dim=8, weights="none").save(model_dir / "embedder.keras")
    args = ("-m", "pnpp_tf.index", f"--model={model_dir}", f"--images={photos}", "--noprogress")
    clean, baseline = run_measured(*args, f"--index={tmp_path / 'clean.index'}")
    assert clean.returncode == 0, clean.stderr[-3000:]
    bomb = bomb_in(photos / "big")
    os.symlink("loop.png", photos / "loop.png")  # a link to itself
    os.symlink("b.jpg", photos / "a.jpg")  # two links to each other
    os.symlink("a.jpg", photos / "b.jpg")
    os.symlink("..", photos / "big" / "up")  # a folder link back to the root: not followed again

    result, peak = run_measured(*args, f"--index={tmp_path / 'photos.index'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Indexed 4 images under {photos}" in result.stdout
    assert "Skipped 4 unreadable file(s):" in result.stdout
    assert f"{bomb}  ({OVER})" in result.stdout
    for name in ("loop.png", "a.jpg", "b.jpg"):
        assert f"{photos / name}  (Too many levels of symbolic links)" in result.stdout
    assert f"Not following {photos / 'big' / 'up'}" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["clean.index", "photos", "photos.index", "run"]
    assert peak < baseline + BUDGET_BYTES, (peak, baseline)


@pytest.mark.slow
def test_training_skips_the_bomb_with_bounded_memory(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")
    args = ("-m", "pnpp_tf.train", *TINY_RUN, "--dataset=folder", "--eval_ks=1", f"--data_dir={data_dir}",
            "--epochs=1", "--warmup_epochs=0", "--on_bad_image=skip")
    clean, baseline = run_measured(*args, f"--model_dir={tmp_path / 'clean'}")
    assert clean.returncode == 0, clean.stderr[-3000:]
    bomb = bomb_in(tmp_path / "data" / "train" / "train_class_02")

    result, peak = run_measured(*args, f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Skipping image {bomb}, over --max_pixels ({OVER})" in result.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["skipped_images"] == {"train": [bomb]}
    assert peak < baseline + BUDGET_BYTES, (peak, baseline)
