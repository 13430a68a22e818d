"""Running the entry points in a subprocess, as a user would."""

import os
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# The smallest run that still exercises every phase: warm-up, training, evaluation.
TINY_RUN = (
    "--backbone=small_cnn", "--weights=none", "--image_size=32", "--embedding_dim=16",
    "--batch_size=8", "--classes_per_batch=2", "--epochs=2", "--warmup_epochs=1",
    "--verbose=0", "--lr=1e-3", "--proxy_lr=10",
)


def run_module(module, *args, timeout=600):
    """Runs `python -m <module> args...`; returns the CompletedProcess (text output)."""
    return run_python("-m", module, *args, timeout=timeout)


def run_python(*args, timeout=600, cwd=None, env=None, tf_log_level="2"):
    """Runs `python args...` (in `cwd`, with `env`, default this process') with the repository
    importable and TensorFlow's C++ log at `tf_log_level`; returns the CompletedProcess."""
    env = dict(os.environ if env is None else env)
    python_path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(TF_CPP_MIN_LOG_LEVEL=tf_log_level, PYTHONPATH=python_path)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=cwd)


def kill_after_first_checkpoint(command, model_dir, delay=0.0):
    """Starts `command` (a training run into `model_dir`, a pathlib.Path) and SIGKILLs it `delay`
    seconds after its first checkpoint is on disk, before it finishes."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    index = model_dir / "checkpoints" / "checkpoint"
    deadline = time.time() + 300
    while not index.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    assert not (model_dir / "results.json").exists()
