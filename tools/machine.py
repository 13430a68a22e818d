"""Shared by the benchmark tools: the machine they ran on, their results files, timing, and workers.

    from machine import Stopwatch, machine_info, describe_machine, write_results

    machine = machine_info(tensorflow=tf.__version__)
    print(f"Machine: {describe_machine(machine)}.")          # the CPU model beside every figure
    write_results(args.json, __file__, argv, machine, rows)  # whole or not at all
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tools run as scripts, so Python puts tools/ on the path, not the repository: without this
# their (and their workers') `import pnpp_tf` would fail unless pnpp_tf were installed.
if REPO not in sys.path:
    sys.path.insert(0, REPO)
# Before any tool imports Keras or TensorFlow: pnpp_tf chooses the CPU kernels (oneDNN on x86) as
# they load, so that a tool measures what pnpp_tf's programs run, and quiets TensorFlow's start-up
# log as the programs' (pnpp_tf/tf_log.py; the tools' workers inherit its TF_CPP_MIN_LOG_LEVEL).
import pnpp_tf  # noqa: E402,F401 pylint: disable=unused-import,wrong-import-position

WORKER_OUTPUT = "--worker_output"


def cpu_model():
    """The CPU's model name.

    Returns:
        The "model name" of /proc/cpuinfo, else what `platform` knows, else "unknown CPU".
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cores():
    """The CPUs this process may run on.

    Returns:
        Their sorted ids: the CPU affinity where the system has one, else 0 .. cpu_count - 1.
    """
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def machine_info(**versions):
    """What a benchmark's figures depend on: the CPU, its cores, and the software.

    Args:
        **versions: further entries, in order, e.g. `gpus=0, tensorflow="2.21.0"`; each one the
            caller gives is also shown by `describe_machine` (gpus, tensorflow, keras).

    Returns:
        A dict with "cpu" (the model), "cores", "usable_cores", the `versions`, and "python".
    """
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(usable_cores()), **versions,
            "python": platform.python_version()}


def describe_machine(machine):
    """One line of the machine, to print under a benchmark's figures.

    Args:
        machine: a dict from `machine_info`.

    Returns:
        E.g. "AMD EPYC 9R14, 2 cores (2 usable), 0 GPU; TensorFlow 2.21.0, Keras 3.12.0, Python
        3.12.3" (the GPU, TensorFlow and Keras parts only where `machine` has them).
    """
    hardware = f"{machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable)"
    if "gpus" in machine:
        hardware += f", {machine['gpus']} GPU"
    names = {"tensorflow": "TensorFlow", "keras": "Keras", "torch": "PyTorch", "python": "Python"}
    software = ", ".join(f"{name} {machine[key]}" for key, name in names.items() if key in machine)
    return f"{hardware}; {software}"


def command_line(script, argv=None):
    """The command that ran a tool, as its results record it.

    Args:
        script: the tool's file (its `__file__`).
        argv: the arguments `main` was given; None: those of this process.

    Returns:
        E.g. "python tools/bench_train.py --steps=5", the script relative to the repository.
    """
    relative = os.path.relpath(os.path.abspath(script), REPO)
    return " ".join(["python", relative, *(sys.argv[1:] if argv is None else argv)])


def write_json(path, value):
    """Writes `value` as JSON whole or not at all (`pnpp_tf.io_utils.write_json`).

    A benchmark killed or out of disk mid-write must not leave half a file for a script (or the
    parent process) to read: an earlier file at `path` stays as it was.

    Args:
        path: the file; its folder is created.
        value: what to write (JSON-serialisable).

    Raises:
        OSError: the write failed (`OutOfSpaceError` on a full disk).
    """
    # Here, not at the top: io_utils imports TensorFlow when it writes, and the tools'
    # parent processes should not pay for it (or start its threads) before they must.
    from pnpp_tf import io_utils  # pylint: disable=import-outside-toplevel

    io_utils.write_json(path, value)


def write_results(path, script, argv, machine, rows, **sections):
    """Writes a benchmark's results file: the machine, the command, the rows, and more.

    Args:
        path: the file (the tool's --json).
        script: the tool's file (its `__file__`), for the command.
        argv: the arguments `main` was given (None: this process').
        machine: a dict from `machine_info`.
        rows: the measurements.
        **sections: further entries, e.g. `data=...`.
    """
    write_json(path, {"machine": machine, **sections, "command": command_line(script, argv), "rows": rows})


def add_output_arguments(parser, contents):
    """Adds --json (the results file) and the hidden --worker_output that `run_measurement` passes.

    Args:
        parser: the tool's `argparse.ArgumentParser`.
        contents: what --json holds, for its help, e.g. "the machine and the rows".
    """
    parser.add_argument("--json", default="", help=f"Also write {contents} to this JSON file.")
    parser.add_argument(WORKER_OUTPUT, default="", help=argparse.SUPPRESS)


class Stopwatch:
    """Times a `with` block: wall seconds, and the CPU seconds this process spent in it.

    CPU time is what the process got of the cores, so ratios of it still mean something when
    other jobs share the machine and stretch the wall time.

        with Stopwatch() as clock:
            step()
        clock.seconds, clock.cpu_seconds
    """

    def __init__(self):
        self.seconds = self.cpu_seconds = None
        self._start = self._cpu_start = None

    def __enter__(self):
        self._start, self._cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info):
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu_start
        return False


def run_measurement(script, args, forwarded, extra, what):
    """Runs one measurement in a fresh Python process; returns the JSON it wrote.

    Fresh, so that it inherits no other measurement's compiled functions, memory, thread pools or
    CPU affinity. The worker writes its result to the path of --worker_output.

    Args:
        script: the tool's file (its `__file__`), run again as the worker.
        args: the tool's parsed arguments.
        forwarded: names of the `args` the worker gets as they are.
        extra: further arguments for the worker, e.g. ["--jit_compile=true"].
        what: the measurement's name, for the error message.

    Returns:
        The worker's result, read from its JSON.

    Raises:
        SystemExit: the worker failed or wrote nothing.
    """
    with tempfile.TemporaryDirectory(prefix="bench_worker_") as folder:
        output = os.path.join(folder, "result.json")
        command = [sys.executable, os.path.abspath(script), *(f"--{name}={getattr(args, name)}" for name in forwarded),
                   *extra, f"{WORKER_OUTPUT}={output}"]
        result = subprocess.run(command, check=False)
        if result.returncode != 0 or not os.path.isfile(output):
            raise SystemExit(f"The {what} measurement failed (exit status {result.returncode}).")
        with open(output, encoding="utf-8") as file:
            return json.load(file)
