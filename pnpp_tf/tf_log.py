"""TensorFlow's log: its warnings and errors by default, all of it when the user asks.

TensorFlow 2.21 writes about ten lines to stderr while it loads and finds its devices, before a
program can say anything. On a CPU-only machine: absl's "All log messages before
absl::InitializeLog() is called are written to STDERR" and "oneDNN custom operations are on"
(twice each), "Could not find cuda drivers" and an error-level "failed call to cuInit: ...
UNKNOWN ERROR (303)". The lines written before TensorFlow's C++ log is set up ignore
TF_CPP_MIN_LOG_LEVEL (3 does not silence them), so the variable alone does not help.

So `prepare()`, which `pnpp_tf/__init__.py` calls before TensorFlow loads, unless the user asked
for everything:
  - sets TF_CPP_MIN_LOG_LEVEL=1 if the user has not set it: once its log is up, TensorFlow drops
    its own C++ INFO lines ("XLA service ... initialized", ...);
  - passes stderr (file descriptor 2) through a filter while `tensorflow` is imported and its
    devices are listed, which applies that level to the lines written before: INFO lines go,
    warnings, errors, fatal lines and anything that is not one of TensorFlow's log lines (a
    Python warning, a traceback) stay. The cuInit failure goes too when TensorFlow found no CUDA
    driver at all, since no GPU can then be there to fail; with a driver it stays.
The programs also drop the INFO records TensorFlow's Python code logs (`quiet_python_info`), such
as the "Sharding callback duration" of every checkpoint.

Everything, as TensorFlow writes it: PNPP_TF_LOG=all (pnpp_tf then changes nothing in
TensorFlow's log), or TF_CPP_MIN_LOG_LEVEL=0. A TF_CPP_MIN_LOG_LEVEL the user set is the level
applied. TensorFlow imported before pnpp_tf is left alone.

The filter runs in a child process reading a pipe (this file, run as a script, standard library
only): if TensorFlow aborts while it loads (a fatal line, say a CPU without the instructions it
was built for), the child still prints what was written up to the abort. The devices are listed
as `tensorflow` is imported, not at the first op, so that cuInit's line falls inside the filter:
a CUDA_VISIBLE_DEVICES set after `import tensorflow` comes too late (set it before, or in the
shell).
"""

import contextlib
import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys

VARIABLE = "PNPP_TF_LOG"
LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = "1"  # TensorFlow's meaning: 0 everything, 1 no INFO, 2 no WARNING, 3 no ERROR

# What `prepare()` decided, for `describe()`: "pnpp_tf", "user", "PNPP_TF_LOG=all" or
# "tensorflow already loaded".
decided_by = None

# glog's line as TensorFlow's C++ code writes it: "I0000 00:00:1796566874.070955   14545 port.cc:153] ..."
# (before its log is set up, the time is "00:00:<seconds since 1970>")
_RECORD = re.compile(rb"^([IWEF])\d{4} [\d:.]+ +\d+ [^\s:\]]+:\d+\] ")
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
_PRE_INIT_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_DRIVER = b"Could not find cuda drivers on your machine"
_CUINIT_FAILED = b"failed call to cuInit"


def prepare():
    """Quiets TensorFlow's start-up log unless the user asked for all of it or it has loaded."""
    global decided_by  # pylint: disable=global-statement - one decision per process
    if os.environ.get(VARIABLE, "").strip().lower() == "all":
        decided_by = f"{VARIABLE}=all"
    elif "tensorflow" in sys.modules:
        decided_by = "tensorflow already loaded"
    else:
        decided_by = "user" if LEVEL_VARIABLE in os.environ else "pnpp_tf"
        os.environ.setdefault(LEVEL_VARIABLE, DEFAULT_LEVEL)
        if level() > 0:
            sys.meta_path.insert(0, _QuietTensorFlowImport(level()))


def level():
    """The TF_CPP_MIN_LOG_LEVEL in effect: 0 (everything) when unset or not a number."""
    try:
        return int(os.environ.get(LEVEL_VARIABLE, "0"))
    except ValueError:
        return 0


def quiet():
    """Whether pnpp_tf leaves out some of TensorFlow's lines in this process."""
    return decided_by in ("pnpp_tf", "user") and level() > 0


def describe():
    """One line for the log: what of TensorFlow's log is shown, and how to see all of it."""
    if quiet():
        shown = {1: "warnings and errors", 2: "errors"}.get(level(), "fatal errors")
        return (f"TensorFlow's log: {shown} ({LEVEL_VARIABLE}={level()}, set by {decided_by}; "
                f"{VARIABLE}=all shows all of it)")
    if decided_by == "tensorflow already loaded":
        return "TensorFlow's log: as TensorFlow writes it (TensorFlow was imported before pnpp_tf)"
    asked = decided_by if decided_by != "user" else f"{LEVEL_VARIABLE}={os.environ.get(LEVEL_VARIABLE)}"
    return f"TensorFlow's log: all of it ({asked})"


def quiet_python_info():
    """Leaves out the INFO records of TensorFlow's Python code (the programs call this).

    TensorFlow logs some through absl (its checkpoint saver: "Sharding callback duration"), which
    the programs show at INFO for their own lines, and some through its "tensorflow" logger.
    """
    if not quiet():
        return
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    absl_logging.get_absl_handler().addFilter(_DropInfoFrom(list(spec.submodule_search_locations)))


class _DropInfoFrom(logging.Filter):
    """Drops records below WARNING logged from files under the given folders."""

    def __init__(self, folders):
        super().__init__()
        self._prefixes = tuple(os.path.join(folder, "") for folder in folders)

    def filter(self, record):
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self._prefixes)


class StartUpFilter:
    """Which of the lines TensorFlow writes while it loads to keep, at a TF_CPP_MIN_LOG_LEVEL."""

    def __init__(self, min_level):
        self._min_level = min_level
        self._no_driver = False

    def keep(self, line):
        """Whether to print `line` (bytes, with or without its newline)."""
        if self._min_level <= 0:
            return True
        if line.rstrip(b"\r\n") == _PRE_INIT_BANNER:
            return False
        match = _RECORD.match(line)
        if not match:
            return True  # not TensorFlow's: a Python warning or a traceback
        self._no_driver = self._no_driver or _NO_DRIVER in line
        severity = _SEVERITY[match.group(1)]
        if severity == 3:
            return True  # TensorFlow never drops a fatal line
        if _CUINIT_FAILED in line and self._no_driver:
            return False
        return severity >= self._min_level


@contextlib.contextmanager
def filtered_stderr(min_level):
    """Passes what is written to file descriptor 2 through a `StartUpFilter` in a child process.

    Falls back to the unfiltered stderr if the child cannot start.
    """
    started = _start_filter(min_level)
    if started is None:
        yield
        return
    child, saved = started
    try:
        yield
    finally:
        _flush_stderr()
        os.dup2(saved, 2)  # the pipe's last writer gone, the child reads its end and stops
        os.close(saved)
        try:
            child.wait(timeout=10)  # so that its lines come before the program's
        except subprocess.TimeoutExpired:  # a process started meanwhile holds the pipe: go on
            pass


def _start_filter(min_level):
    """Starts the filter child and points fd 2 at it; (child, the saved fd 2), or None."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        return None
    try:
        read_end, write_end = os.pipe()
    except OSError:
        os.close(saved)
        return None
    try:
        child = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), str(min_level)],
                                 stdin=read_end, stdout=saved, stderr=saved)
    except (OSError, ValueError):
        child = None
    os.close(read_end)
    if child is None:
        os.close(write_end)
        os.close(saved)
        return None
    _flush_stderr()
    os.dup2(write_end, 2)
    os.close(write_end)
    return child, saved


def _flush_stderr():
    if sys.stderr is not None:
        sys.stderr.flush()


class _QuietTensorFlowImport:  # a meta path finder
    """Imports `tensorflow` (once) and lists its devices with stderr through the filter."""

    def __init__(self, min_level):
        self.min_level = min_level
        self._done = False

    def find_spec(self, fullname, path=None, target=None):
        del path, target
        if fullname != "tensorflow" or self._done:
            return None
        self._done = True  # before the search below, which asks this finder too
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _QuietLoader(spec.loader, self)
        return spec

    def remove(self):
        if self in sys.meta_path:
            sys.meta_path.remove(self)


class _QuietLoader:  # a loader
    """TensorFlow's own loader, run with stderr filtered; it gives itself back before running."""

    def __init__(self, loader, finder):
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader  # TensorFlow sees its own loader
        try:
            with filtered_stderr(self._finder.min_level):
                self._loader.exec_module(module)
                # The cuInit failure is logged when the devices are first listed, not on import.
                try:
                    module.config.list_physical_devices()
                except Exception:  # pylint: disable=broad-except - raised again, unfiltered, at the first op
                    pass
        finally:
            self._finder.remove()


def _filter_pipe(min_level):
    """The child: stdin's lines through a `StartUpFilter` to stdout, until the pipe ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle
    keep, source, sink = StartUpFilter(min_level).keep, sys.stdin.buffer, sys.stdout.buffer
    for line in iter(source.readline, b""):
        if keep(line):
            try:
                sink.write(line)
                sink.flush()
            except OSError:
                pass  # stderr went away: keep reading so that the parent never blocks


if __name__ == "__main__":
    _filter_pipe(int(sys.argv[1]))
