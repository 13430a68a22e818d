"""tools/machine.py: the benchmark tools' machine description, results files, stopwatch and workers."""

import argparse
import importlib.util
import json
import os
import sys

import pytest
import tensorflow as tf

from cli_helpers import REPO

_SPEC = importlib.util.spec_from_file_location("bench_machine", REPO / "tools" / "machine.py")
machine = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(machine)

ROWS = [{"backbone": "small_cnn", "images_per_second": 12.5}, {"backbone": "resnet50", "images_per_second": 1.25}]


def test_results_file_is_whole_json_with_the_cpu_model_and_the_command(tmp_path):
    path = tmp_path / "out" / "results.json"  # the folder does not exist yet
    info = machine.machine_info(gpus=0, tensorflow=tf.__version__)
    machine.write_results(str(path), str(REPO / "tools" / "bench_train.py"), ["--steps=5", "--seed=1"], info,
                          ROWS, data={"files": 20})
    report = json.loads(path.read_text(encoding="utf-8"))
    assert set(report) == {"machine", "data", "command", "rows"}
    assert report["machine"]["cpu"] == machine.cpu_model() and report["machine"]["cpu"]
    assert report["machine"]["gpus"] == 0 and report["machine"]["tensorflow"] == tf.__version__
    assert report["machine"]["usable_cores"] == len(machine.usable_cores()) >= 1
    assert report["command"] == "python tools/bench_train.py --steps=5 --seed=1"
    assert report["rows"] == ROWS and report["data"] == {"files": 20}
    assert os.listdir(path.parent) == ["results.json"]  # no temporary left beside it


def test_a_write_that_fails_halfway_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    machine.write_json(str(path), {"rows": ROWS})
    old = path.read_bytes()

    def half_then_fail(self, contents):
        real_write(self, contents[:len(contents) // 2])
        raise OSError("disk went away")

    real_write = tf.io.gfile.GFile.write
    monkeypatch.setattr(tf.io.gfile.GFile, "write", half_then_fail)
    with pytest.raises(OSError, match="disk went away"):
        machine.write_json(str(path), {"rows": ROWS * 100})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["results.json"]


def test_describe_machine_puts_the_cpu_model_beside_what_is_known():
    base = {"cpu": "Some CPU 9000", "cores": 8, "usable_cores": 2, "python": "3.12.1"}
    assert machine.describe_machine(base) == "Some CPU 9000, 8 cores (2 usable); Python 3.12.1"
    full = {**base, "gpus": 1, "tensorflow": "2.21.0", "keras": "3.12.0"}
    assert machine.describe_machine(full) == ("Some CPU 9000, 8 cores (2 usable), 1 GPU; TensorFlow 2.21.0, "
                                              "Keras 3.12.0, Python 3.12.1")
    assert machine.describe_machine(machine.machine_info()).startswith(machine.cpu_model() + ", ")


def test_command_line_defaults_to_this_process_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ignored.py", "--quick", "--configs=sop_quick"])
    assert machine.command_line(REPO / "tools" / "bench_eval.py") == (
        "python tools/bench_eval.py --quick --configs=sop_quick")
    assert machine.command_line(REPO / "tools" / "bench_eval.py", []) == "python tools/bench_eval.py"


def test_stopwatch_measures_wall_and_cpu_time_of_the_block(monkeypatch):
    clocks = {"perf_counter": iter([10.0, 12.5]), "process_time": iter([3.0, 4.0])}  # start, end
    for name, values in clocks.items():
        monkeypatch.setattr(machine.time, name, lambda values=values: next(values))
    with machine.Stopwatch() as clock:
        assert clock.seconds is None  # not yet: only on leaving the block
    assert (clock.seconds, clock.cpu_seconds) == (2.5, 1.0)


WORKER = """
import argparse, json, sys
parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int)
parser.add_argument("--mode")
parser.add_argument("--worker_output")
args = parser.parse_args()
if args.mode == "fail":
    sys.exit(3)
with open(args.worker_output, "w") as file:
    json.dump({"size": args.size, "mode": args.mode, "argv": sys.argv[1:]}, file)
"""


def test_run_measurement_forwards_arguments_and_returns_the_worker_json(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    args = argparse.Namespace(size=7, seed=1)
    result = machine.run_measurement(str(script), args, ["size"], ["--mode=fast"], "fast")
    assert result["size"] == 7 and result["mode"] == "fast"
    assert result["argv"][:2] == ["--size=7", "--mode=fast"] and result["argv"][2].startswith("--worker_output=")
    with pytest.raises(SystemExit, match="The slow measurement failed \\(exit status 3\\)"):
        machine.run_measurement(str(script), args, ["size"], ["--mode=fail"], "slow")


def test_output_arguments_hide_the_worker_flag():
    parser = argparse.ArgumentParser()
    machine.add_output_arguments(parser, "the rows")
    args = parser.parse_args(["--json=a.json", "--worker_output=b.json"])
    assert (args.json, args.worker_output) == ("a.json", "b.json")
    assert "worker_output" not in parser.format_help() and "Also write the rows" in parser.format_help()
