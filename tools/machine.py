"""Shared by the benchmark tools: the machine they ran on, and their worker processes."""

import json
import os
import platform
import subprocess


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_measurement(command, what):
    """Runs one measurement in a fresh Python process; returns the JSON it wrote to --worker_output.

    Args:
        command: the worker's command line, ending with `--worker_output=PATH`.
        what: the measurement's name, for the error message.
    """
    output = command[-1].split("=", 1)[1]
    result = subprocess.run(command, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), check=False)
    if result.returncode != 0 or not os.path.isfile(output):
        raise SystemExit(f"The {what} measurement failed (exit status {result.returncode}).")
    with open(output, encoding="utf-8") as file:
        return json.load(file)
