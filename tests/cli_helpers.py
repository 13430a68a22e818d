"""Running the entry points in a subprocess, as a user would."""

import os
import pathlib
import subprocess
import sys

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


def run_python(*args, timeout=600, cwd=None):
    """Runs `python args...` (in `cwd`) with the repository importable; returns the CompletedProcess."""
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=python_path)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=cwd)
