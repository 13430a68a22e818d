"""oneDNN's kernels by default on x86, the user's TF_ENABLE_ONEDNN_OPTS kept, said once in the log."""

import os
import platform

import pytest

from cli_helpers import run_module, run_python

X86 = platform.machine().lower() in ("x86_64", "amd64")
# TensorFlow says which kernels it loaded when it loads them.
ONEDNN_ON = "oneDNN custom operations are on"


def without_switch():
    return {name: value for name, value in os.environ.items() if name != "TF_ENABLE_ONEDNN_OPTS"}


def tensorflow_after_pnpp_tf(env):
    return run_python("-c", "import os, pnpp_tf, tensorflow; print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'))",
                      env=env, tf_log_level="0")


@pytest.mark.skipif(not X86, reason="the default is set on x86 only")
def test_importing_pnpp_tf_first_turns_onednn_on():
    result = tensorflow_after_pnpp_tf(without_switch())
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1"]
    assert ONEDNN_ON in result.stderr


@pytest.mark.parametrize("value", ["0", "1"])
def test_the_users_choice_is_kept(value):
    result = tensorflow_after_pnpp_tf({**without_switch(), "TF_ENABLE_ONEDNN_OPTS": value})
    assert result.stdout.split() == [value]
    assert (ONEDNN_ON in result.stderr) == (value == "1")


def test_tensorflow_loaded_first_is_left_alone():
    result = run_python("-c", "import os, tensorflow, pnpp_tf.cpu_kernels as k; "
                              "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), k.decided_by)", env=without_switch())
    assert result.stdout.split() == ["None", "tensorflow", "already", "loaded"]


def test_the_entry_points_log_the_kernels_and_the_cpu():
    result = run_module("pnpp_tf.check_data", "--dataset=folder", "--data_dir=/nonexistent/data")
    assert result.returncode == 2
    line = next(line for line in result.stderr.splitlines() if "CPU kernels:" in line)
    assert "TF_ENABLE_ONEDNN_OPTS=" in line and "chosen by" in line and "CPU: " in line
