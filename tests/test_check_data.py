"""python -m pnpp_tf.check_data: a table, the problems, and an exit status a script can use."""

import json
import os
import shutil

import pytest

from cli_helpers import run_module
from conftest import make_folder_dataset
from odd_images import write_odd_images

pytestmark = pytest.mark.slow  # end-to-end runs of the programs


def test_clean_dataset_is_ready(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", images_per_class=4)
    result = run_module("pnpp_tf.check_data", "--dataset=folder", f"--data_dir={data_dir}",
                        f"--json={tmp_path / 'report.json'}")
    assert result.returncode == 0, result.stderr[-2000:]
    # images, classes, undecodable, over --max_pixels, unanswerable classes, small classes
    assert "| train | 16 | 4 | 0 | 0 | 0 | 0 |" in result.stdout and "Ready to train." in result.stdout
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True


def test_reports_undecodable_files_and_small_classes(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", images_per_class=3)
    _, bad = write_odd_images(str(tmp_path / "odd"))
    shutil.copy(bad["truncated.png"], tmp_path / "data" / "test" / "test_class_00" / "truncated.png")
    result = run_module("pnpp_tf.check_data", "--dataset=folder", f"--data_dir={data_dir}",
                        "--batch_size=32", "--classes_per_batch=8", f"--json={tmp_path / 'report.json'}")
    assert result.returncode == 1
    assert "test: cannot decode" in result.stdout and "truncated.png" in result.stdout
    assert "4 class(es) have fewer than 4 images" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["splits"]["test"]["bad_images"]) == 1 and report["ok"] is False


def test_unreadable_dataset_is_a_one_line_error(tmp_path):
    result = run_module("pnpp_tf.check_data", "--dataset=sop", f"--data_dir={tmp_path}")
    assert result.returncode == 2
    assert "pnpp_tf.check_data: error:" in result.stderr and "Ebay_train.txt is missing" in result.stderr


def check(data_dir, *flags):
    """Runs check_data on a folder dataset; returns (the CompletedProcess, the JSON report)."""
    report = os.path.join(os.path.dirname(data_dir), "report.json")
    result = run_module("pnpp_tf.check_data", "--dataset=folder", f"--data_dir={data_dir}", f"--json={report}",
                        *flags)
    with open(report, encoding="utf-8") as file:
        return result, json.load(file)


def test_a_test_class_of_one_readable_image_cannot_be_answered(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", images_per_class=2)
    os.remove(os.path.join(data_dir, "test", "test_class_01", "img_1.jpg"))
    # Two files, but one does not decode: its queries have no right answer either.
    _, bad = write_odd_images(str(tmp_path / "odd"))
    shutil.copy(bad["truncated.png"], os.path.join(data_dir, "test", "test_class_02", "img_1.jpg"))
    result, report = check(data_dir)
    assert result.returncode == 1
    assert ("test: 2 class(es) have fewer than two images, so their queries can never be answered, "
            "e.g. test_class_01, test_class_02") in result.stdout
    assert "| test | 5 | 3 | 1 | 0 | 2 |" in result.stdout
    assert "add images to the unanswerable classes or remove them" in result.stdout
    assert report["splits"]["test"]["unanswerable_classes"] == ["test_class_01", "test_class_02"]
    assert report["splits"]["train"]["unanswerable_classes"] == [] and report["ok"] is False


def test_a_query_class_needs_a_gallery_image(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", images_per_class=2, eval_dirs=("query", "gallery"))
    shutil.rmtree(os.path.join(data_dir, "query", "test_class_00"))  # a gallery class without queries: fine
    for name in os.listdir(os.path.join(data_dir, "query", "test_class_01"))[1:]:
        os.remove(os.path.join(data_dir, "query", "test_class_01", name))  # one query: fine
    result, report = check(data_dir)
    assert result.returncode == 0 and "Ready to train." in result.stdout, result.stdout

    shutil.rmtree(os.path.join(data_dir, "gallery", "test_class_02"))
    result, report = check(data_dir)
    assert result.returncode == 1
    assert ("query: 1 class(es) have fewer than a gallery image, so their queries can never be answered, "
            "e.g. test_class_02") in result.stdout
    assert report["splits"]["query"]["unanswerable_classes"] == ["test_class_02"]
    assert report["splits"]["gallery"]["unanswerable_classes"] == []


def test_max_pixels_is_the_budget_checked(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")  # 40 x 36 images: 1440 pixels each
    result, report = check(data_dir, "--max_pixels=1439")
    assert result.returncode == 1
    assert "| train | 16 | 4 | 0 | 16 |" in result.stdout
    first = report["splits"]["train"]["bad_images"][0]
    assert first[1] == "40x36 = 1440 pixels, more than max_pixels=1439"
    assert f"train: {first[0]} is too large: 40x36 = 1440 pixels" in result.stdout
    assert report["max_pixels"] == 1439 and len(report["splits"]["test"]["over_max_pixels"]) == 12
