"""Every kind of odd and bad image file, through the pipeline, for both --on_bad_image settings."""

import json
import os

import numpy as np
import pytest

from cli_helpers import TINY_RUN, run_module
from conftest import make_folder_dataset
from odd_images import write_odd_images
from pnpp_tf.data import Split, pipeline
from pnpp_tf.data.image_check import check_images, drop_or_raise


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    return write_odd_images(str(tmp_path_factory.mktemp("odd")))


def test_every_decodable_kind_becomes_an_rgb_image(odd_files):
    good, _ = odd_files
    for name, path in good.items():
        image = pipeline.decode_image(path).numpy()
        assert image.shape == (20, 30, 3), name
        assert 0 <= image.min() and image.max() <= 255 and image.std() > 10, name
    # The first frame, not the inverted second one (GIF's palette changes a few colours).
    first_frame = pipeline.decode_image(good["animated.gif"]).numpy()
    assert np.abs(first_frame - pipeline.decode_image(good["rgb.png"]).numpy()).mean() < 10


def test_check_finds_exactly_the_broken_files(odd_files):
    good, bad = odd_files
    result = check_images(list(good.values()) + list(bad.values()))
    assert result.checked == len(good) + len(bad)
    assert sorted(path for path, _ in result.bad) == sorted(bad.values())
    reasons = dict(result.bad)
    assert reasons[bad["empty.jpg"]] == "empty file"
    assert "Unknown image file format" in reasons[bad["text.png"]]


def make_split(good, bad):
    paths = [good["rgb.jpg"], good["grey.jpg"], bad["truncated.png"], good["rgb.png"], bad["empty.jpg"]]
    return Split(paths, np.array([0, 0, 1, 1, 1]), ["a", "b"])


def test_error_names_the_bad_files(odd_files):
    with pytest.raises(ValueError, match=r"2 unreadable image\(s\) in train: .*truncated.png .*empty.jpg"):
        drop_or_raise(make_split(*odd_files), "train", "error")


def test_skip_drops_them_and_says_which(odd_files):
    good, bad = odd_files
    kept, skipped = drop_or_raise(make_split(good, bad), "train", "skip")
    assert kept.paths == [good["rgb.jpg"], good["grey.jpg"], good["rgb.png"]]
    assert kept.labels.tolist() == [0, 0, 1]
    assert skipped == sorted([bad["truncated.png"], bad["empty.jpg"]])


def test_skip_refuses_to_empty_a_class(odd_files):
    good, bad = odd_files
    split = Split([good["rgb.jpg"], bad["text.png"]], np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="empties 1 class"):
        drop_or_raise(split, "test", "skip")


@pytest.mark.slow
def test_training_skips_and_reports_bad_images(tmp_path, odd_files):
    _, bad = odd_files
    data_dir = make_folder_dataset(tmp_path / "data")
    target = tmp_path / "data" / "train" / "train_class_00" / "truncated.jpg"
    target.write_bytes(open(bad["truncated.jpg"], "rb").read())
    result = run_module("pnpp_tf.train", *TINY_RUN, "--dataset=folder", "--eval_ks=1", f"--data_dir={data_dir}",
                        f"--model_dir={tmp_path / 'run'}", "--epochs=1", "--warmup_epochs=0",
                        "--on_bad_image=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipping unreadable image" in result.stderr and "truncated.jpg" in result.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["skipped_images"] == {"train": [str(target)]}


def test_images_over_max_pixels_are_named_with_their_size(odd_files):
    good, bad = odd_files
    split = Split([good["rgb.jpg"], good["rgb.png"], bad["text.png"]], np.array([0, 1, 1]), ["a", "b"])
    over = "30x20 = 600 pixels, more than max_pixels=599"
    with pytest.raises(ValueError, match=rf"3 unreadable or too large \(2 over --max_pixels\) image\(s\) in train: "
                                         rf".*rgb.jpg \({over}\); .*rgb.png \({over}\); .*text.png \(Unknown image"
                                         r".*raise --max_pixels, or pass --on_bad_image=skip"):
        drop_or_raise(split, "train", "error", max_pixels=599)
    with pytest.raises(ValueError, match=r"^1 too large image\(s\) in train: "):
        drop_or_raise(Split([good["rgb.jpg"]], np.array([0]), ["a"]), "train", "error", max_pixels=599)
    kept, skipped = drop_or_raise(split, "train", "skip", max_pixels=600)
    assert kept.paths == [good["rgb.jpg"], good["rgb.png"]] and skipped == [bad["text.png"]]


def test_files_that_cannot_be_read_are_named_not_fatal(tmp_path):
    os.symlink("loop.png", tmp_path / "loop.png")
    os.symlink("b.jpg", tmp_path / "a.jpg")
    os.symlink("a.jpg", tmp_path / "b.jpg")
    os.symlink("nowhere.png", tmp_path / "dangling.png")
    (tmp_path / "folder.png").mkdir()
    paths = [str(tmp_path / name) for name in ("loop.png", "a.jpg", "dangling.png", "folder.png")]
    reasons = dict(check_images(paths).bad)
    assert [reasons[path] for path in paths] == ["Too many levels of symbolic links"] * 2 + [
        "file not found", "Is a directory"]
