"""The programs' first line is pnpp_tf's own: TensorFlow's start-up noise left out, its warnings
and errors kept, all of it with PNPP_TF_LOG=all or TF_CPP_MIN_LOG_LEVEL=0 (pnpp_tf/tf_log.py)."""

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cli_helpers import REPO
from pnpp_tf import tf_log

# What TensorFlow 2.21 wrote before the first line of every program on a CPU-only x86 machine
# (Intel Xeon KVM guest, TF_CPP_MIN_LOG_LEVEL unset), abridged.
CPU_MACHINE_START_UP = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 00:00:1796566874.070955   14545 port.cc:153] oneDNN custom operations are on. You may see slightly\n",
    b"I0000 00:00:1796566874.071380   14545 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
    b"will not be used.\n",
    b"E0000 00:00:1796566878.014542   14545 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    b"Failed call to cuInit: UNKNOWN ERROR (303)\n",
]
# Markers of those lines (and of the INFO lines TensorFlow logs once its log is up).
NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub.cc", "cuInit", "binary is optimized",
         "XLA service", "Sharding callback duration")
WARNING = b"W0000 00:00:1796566874.1   14545 loader.cc:42] Cannot dlopen some GPU libraries.\n"
FATAL = b"F0000 00:00:1796566874.2   14545 cpu_feature_guard.cc:79] The TensorFlow library was compiled to use AVX\n"


def clean_env(**extra):
    """This process' environment without the log switches (cli_helpers.run_python sets one)."""
    env = {k: v for k, v in os.environ.items() if k not in (tf_log.LEVEL_VARIABLE, tf_log.VARIABLE)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra.pop("prepend_path", None), str(REPO)]))
    return {**env, **extra}


def kept(lines, level):
    keep = tf_log.StartUpFilter(level).keep
    return [line for line in lines if keep(line)]


def noise_in(text):
    return [marker for marker in NOISE if marker in text]


def test_a_cpu_machines_start_up_lines_are_left_out_by_default_and_kept_at_level_0():
    assert kept(CPU_MACHINE_START_UP, 1) == []
    assert kept(CPU_MACHINE_START_UP, 0) == CPU_MACHINE_START_UP


def test_warnings_errors_fatal_lines_and_python_output_are_kept():
    python = [b"/x/y.py:3: UserWarning: something\n", b"Traceback (most recent call last):\n", b"  ImportError: no\n"]
    lines = [*CPU_MACHINE_START_UP[:3], WARNING, *python, FATAL]
    assert kept(lines, 1) == [WARNING, *python, FATAL]
    assert kept(lines, 2) == [*python, FATAL]  # TensorFlow's meaning of 2: no warnings
    assert kept(lines, 3) == [*python, FATAL]  # and of 3: no errors; a fatal line is never dropped


def test_cuinit_failing_with_a_cuda_driver_installed_is_kept():
    """Only without a driver can there be no GPU to fail: with one, cuInit's failure is real."""
    assert kept([CPU_MACHINE_START_UP[1], CPU_MACHINE_START_UP[3]], 1) == [CPU_MACHINE_START_UP[3]]


def test_tensorflows_python_info_records_are_dropped_and_its_warnings_kept():
    keep = tf_log._DropInfoFrom(["/site/tensorflow"]).filter  # pylint: disable=protected-access

    def record(level, path):
        return logging.LogRecord("absl", level, path, 440, "Sharding callback duration: %s", (5,), None)

    assert not keep(record(logging.INFO, "/site/tensorflow/python/checkpoint/functional_saver.py"))
    assert keep(record(logging.WARNING, "/site/tensorflow/python/checkpoint/functional_saver.py"))
    assert keep(record(logging.INFO, "/site/tensorflow_other/x.py"))  # a folder's prefix is not the folder
    assert keep(record(logging.INFO, str(REPO / "pnpp_tf" / "train.py")))


# A stand-in for TensorFlow, put first on PYTHONPATH: it writes the lines of $FAKE_TF as it loads.
FAKE_TENSORFLOW = textwrap.dedent("""
    import os, warnings
    mode = os.environ["FAKE_TF"]
    for line in {start_up!r}[:2 if mode == "gpu_fails" else 3]:  # with a driver: no "Could not find"
        os.write(2, line)
    if mode == "gpu_fails":
        os.write(2, {cuinit!r})
    if mode == "warns":
        os.write(2, {warning!r})
        warnings.warn("a Python warning while TensorFlow loads")
    if mode == "fatal":
        os.write(2, {fatal!r})
        os.abort()
    if mode == "import_error":
        raise ImportError("libtensorflow_framework.so.2: cannot open shared object file")

    class config:
        listed = False

        @classmethod
        def list_physical_devices(cls):  # TensorFlow logs cuInit's failure on the first listing only
            if mode == "no_driver" and not cls.listed:
                os.write(2, {cuinit_no_driver!r})
            cls.listed = True
            return []
""").format(start_up=CPU_MACHINE_START_UP, cuinit=CPU_MACHINE_START_UP[3].replace(b"UNKNOWN ERROR (303)", b"999"),
            cuinit_no_driver=CPU_MACHINE_START_UP[3], warning=WARNING, fatal=FATAL)

# Then as a program goes on: its first op lists the devices.
IMPORT_BOTH = ("import sys, pnpp_tf, tensorflow; from pnpp_tf import tf_log; tensorflow.config.list_physical_devices(); "
               "print('loaded', type(tensorflow.__loader__).__name__, "
               "any(isinstance(f, tf_log._QuietTensorFlowImport) for f in sys.meta_path))")


@pytest.fixture(scope="module")
def fake_tensorflow(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake")
    (folder / "tensorflow").mkdir()
    (folder / "tensorflow" / "__init__.py").write_text(FAKE_TENSORFLOW)
    return str(folder)


def import_fake(fake_tensorflow, mode, **env):
    return subprocess.run([sys.executable, "-c", IMPORT_BOTH], capture_output=True, timeout=120,
                          env=clean_env(prepend_path=fake_tensorflow, FAKE_TF=mode, **env))


def test_the_import_is_quiet_and_tensorflow_keeps_its_own_loader(fake_tensorflow):
    result = import_fake(fake_tensorflow, "no_driver")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    assert result.stdout.split() == [b"loaded", b"SourceFileLoader", b"False"]  # the hook is gone


@pytest.mark.parametrize("asked", [{"PNPP_TF_LOG": "all"}, {"PNPP_TF_LOG": "ALL", "TF_CPP_MIN_LOG_LEVEL": "2"},
                                   {"TF_CPP_MIN_LOG_LEVEL": "0"}])
def test_everything_when_the_user_asks(fake_tensorflow, asked):
    result = import_fake(fake_tensorflow, "no_driver", **asked)
    assert result.stderr.splitlines(keepends=True) == CPU_MACHINE_START_UP


@pytest.mark.parametrize("mode, expected", [
    ("gpu_fails", [b"cuInit"]),
    ("warns", [b"Cannot dlopen some GPU libraries", b"UserWarning: a Python warning while TensorFlow loads"]),
    ("import_error", [b"ImportError: libtensorflow_framework.so.2: cannot open shared object file"]),
    ("fatal", [b"The TensorFlow library was compiled to use AVX"]),
])
def test_real_problems_are_shown_even_when_the_process_dies(fake_tensorflow, mode, expected):
    result = import_fake(fake_tensorflow, mode)
    for text in expected:
        assert text in result.stderr, result.stderr.decode()
    others = [line for line in result.stderr.decode().splitlines() if "999" not in line]
    assert not noise_in("\n".join(others)), result.stderr.decode()
    if mode == "fatal":  # the filter, a process of its own, still printed what came before the abort
        assert result.returncode == -signal.SIGABRT
    elif mode == "import_error":
        assert result.returncode == 1


def test_importing_pnpp_tf_alone_does_not_load_tensorflow():
    result = subprocess.run([sys.executable, "-c", "import sys, pnpp_tf; print('tensorflow' in sys.modules)"],
                            capture_output=True, text=True, env=clean_env(), timeout=120)
    assert result.stdout.split() == ["False"], result.stderr


def run_program(module, *args, **env):
    """Runs `python -m <module> args` with only `env` as log switches; returns its stderr."""
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600,
                            env=clean_env(**env))
    assert result.returncode == 2, result.stderr[-3000:]  # the one-line error the arguments provoke
    assert not noise_in(result.stdout)
    return result.stderr


@pytest.mark.parametrize("module", ["pnpp_tf.check_data", "pnpp_tf.train"])
def test_a_programs_first_line_is_its_own(module, tmp_path):
    model_dir = [f"--model_dir={tmp_path}"] if module == "pnpp_tf.train" else []
    stderr = run_program(module, "--dataset=folder", "--data_dir=/nonexistent/data", *model_dir)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert f"] {module}: pnpp_tf " in lines[0] and "TensorFlow 2." in lines[0], stderr
    assert "TensorFlow's log: warnings and errors" in lines[0] and "PNPP_TF_LOG=all shows all" in lines[0]
    assert "CPU kernels: " in lines[1]
    assert lines[-1] == f"{module}: error: --data_dir=/nonexistent/data does not exist or is not a directory."
    assert len(lines) == 3, stderr
    assert not noise_in(stderr), stderr


@pytest.mark.parametrize("asked", [{"PNPP_TF_LOG": "all"}, {"TF_CPP_MIN_LOG_LEVEL": "0"}])
def test_a_program_shows_all_of_tensorflows_log_when_asked(asked, tmp_path):
    stderr = run_program("pnpp_tf.train", "--dataset=folder", "--data_dir=/nonexistent/data",
                         f"--model_dir={tmp_path}", **asked)
    assert noise_in(stderr), stderr  # which lines depends on the machine; on x86 oneDNN's at least
    assert "TensorFlow's log: all of it" in stderr


def test_a_checkpoints_info_line_is_left_out_and_the_programs_own_kept(tmp_path):
    script = ("import pnpp_tf; from pnpp_tf import tf_log; import tensorflow as tf; from absl import logging; "
              "logging.use_absl_handler(); logging.set_verbosity(logging.INFO); tf_log.quiet_python_info(); "
              f"logging.info('mine'); tf.train.Checkpoint(v=tf.Variable(1.0)).save({str(tmp_path / 'ckpt')!r})")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=clean_env(),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "] mine" in result.stderr and not noise_in(result.stderr), result.stderr
