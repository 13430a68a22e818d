"""python -m pnpp_tf.check_data: a table, the problems, and an exit status a script can use."""

import json
import shutil

from cli_helpers import run_module
from conftest import make_folder_dataset
from odd_images import write_odd_images


def test_clean_dataset_is_ready(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", images_per_class=4)
    result = run_module("pnpp_tf.check_data", "--dataset=folder", f"--data_dir={data_dir}",
                        f"--json={tmp_path / 'report.json'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| train | 16 | 4 | 0 | 0 |" in result.stdout and "Ready to train." in result.stdout
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
