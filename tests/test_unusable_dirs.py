"""An output directory that cannot be used is one line and exit status 2, before any work starts.

For each program's output path (train's --model_dir, export's --export_dir, evaluate's
--output_dir or --model_dir, index's --index) and each way it can be unusable: a file, under a
file, a read-only file system, no permission; and train's <model_dir>/run.lock that is a folder.
The read-only cases mount a tmpfs read-only (root only, else skipped); the permission case runs
the programs as the unprivileged user "nobody" when the tests run as root (root ignores
permission bits), and as the user otherwise.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

from cli_helpers import REPO, run_module
from pnpp_tf import evaluate, export, index, train
from pnpp_tf.catalogue_config import IndexConfig
from pnpp_tf.config import EvaluateConfig, TrainConfig
from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import check_writable_dir, check_writable_file
from pnpp_tf.run_lock import LOCK_FILE, RunLock

NOBODY = 65534
TESTS = os.path.dirname(os.path.abspath(__file__))


def message_of(program, path):
    """The UserError message `program` stops with when its output path is `path` (None if none).

    Each is called as the entry point calls it; none gets as far as reading a model or an image.
    """
    calls = {
        "train": lambda: train.train(TrainConfig(model_dir=path, dataset="folder", data_dir="/nowhere",
                                                 backbone="small_cnn", weights="none")),
        "train_cache": lambda: train.train(TrainConfig(model_dir=tempfile.mkdtemp(), cache_dir=path, dataset="folder",
                                                       data_dir="/nowhere", backbone="small_cnn", weights="none")),
        "export": lambda: export.export("/nowhere", path),
        "evaluate": lambda: evaluate.evaluate(EvaluateConfig(dataset="folder", saved_model="/nowhere",
                                                             output_dir=path)),
        "evaluate_model_dir": lambda: evaluate.evaluate(EvaluateConfig(dataset="folder", model_dir=path)),
        "index": lambda: index.run(IndexConfig(model="/nowhere", images="/nowhere", index=path)),
        "check": lambda: check_writable_dir(path, "--model_dir"),
    }
    try:
        calls[program]()
    except UserError as error:
        return str(error)
    return None


PROGRAMS = {  # program: (flag, what it says about `path`, the advice)
    "train": ("--model_dir", "{path}", "choose another --model_dir"),
    "train_cache": ("--cache_dir", "{path}", "choose another --cache_dir"),
    "export": ("--export_dir", "{path}", "choose another --export_dir"),
    "evaluate": ("--output_dir", "{path}", "choose another --output_dir"),
    "evaluate_model_dir": ("--model_dir", "{path}", "pass --output_dir to write eval_folder.json elsewhere"),
    "index": ("--index", "{path}", "choose another --index"),
}


def assert_one_line(message, program, path, problem):
    flag, subject, advice = PROGRAMS[program]
    expected = f"{flag}={subject.format(path=path)} {problem}; {advice}."
    assert message == expected, (message, expected)


@pytest.fixture
def file_in(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    return blocker


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_an_output_path_that_is_a_file(file_in, program):
    assert_one_line(message_of(program, str(file_in)), program, file_in, "is a file, not a directory")


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_an_output_path_under_a_file(file_in, program):
    path = file_in / "run"
    assert_one_line(message_of(program, str(path)), program, path, f"lies under {file_in}, which is a file")


@pytest.fixture
def read_only(tmp_path):
    """A folder on a read-only tmpfs that holds an `existing/` folder; skipped unless root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "read_only"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        (mount_point / "existing").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True, capture_output=True)
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_an_output_path_on_a_read_only_file_system(read_only, program):
    existing, missing = read_only / "existing", read_only / "existing" / "run"
    if program == "train_cache":  # a prebuilt cache may be read-only: training reads it (here: no data)
        assert message_of(program, str(existing)) == "--data_dir=/nowhere does not exist or is not a directory."
    else:
        assert_one_line(message_of(program, str(existing)), program, existing, "is on a read-only file system")
    assert_one_line(message_of(program, str(missing)), program, missing,
                    f"cannot be created: {existing} is on a read-only file system")
    assert os.listdir(existing) == []


@pytest.fixture
def unwritable(tmp_path):
    """(a folder the user can read but not write, one anyone may write, the program runner): as
    root, the runner calls the programs in a child process running as the user "nobody"."""
    # The folders live outside pytest's own (mode 700, which nobody could not even enter).
    outside = tempfile.mkdtemp(prefix="pnpp_tf_unwritable_", dir="/tmp")
    try:
        os.chmod(outside, 0o755)
        locked = os.path.join(outside, "locked")
        os.mkdir(locked, 0o555)
        os.chmod(locked, 0o555)  # whatever the umask
        open_to_all = os.path.join(outside, "open")
        os.mkdir(open_to_all)
        os.chmod(open_to_all, 0o777)
        yield locked, open_to_all, (run_as_nobody if os.geteuid() == 0 else run_here)
    finally:
        os.chmod(os.path.join(outside, "locked"), 0o755)
        subprocess.run(["rm", "-rf", outside], check=False)


def run_here(calls):
    return [message_of(program, path) for program, path in calls]


def run_as_nobody(calls):
    """`message_of` for each (program, path) of `calls`, in one child process run as nobody."""
    # Everything is imported as root first: the interpreter's own library may not be readable by
    # nobody. The checks themselves then run without root's disregard for permission bits.
    code = (f"import json, os, sys; sys.path[:0] = [{TESTS!r}, {str(REPO)!r}]; import test_unusable_dirs as t; "
            f"os.setgid({NOBODY}); os.setuid({NOBODY}); "
            f"print(json.dumps([t.message_of(program, path) for program, path in {calls!r}]))")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_an_output_path_without_permission(unwritable):
    locked, open_to_all, run = unwritable
    missing = os.path.join(locked, "run")
    calls = ([(program, locked) for program in sorted(PROGRAMS)]
             + [(program, missing) for program in ("train", "train_cache", "export", "index")] + [("check", open_to_all)])
    messages = dict(zip(calls, run(calls)))
    for program in set(PROGRAMS) - {"train_cache"}:
        assert_one_line(messages[program, locked], program, locked, "is not writable (permission denied)")
    # A prebuilt cache may be read-only: training goes on to read it (here: no data).
    assert messages["train_cache", locked] == "--data_dir=/nowhere does not exist or is not a directory."
    for program in ("train", "train_cache", "export", "index"):
        assert_one_line(messages[program, missing], program, missing,
                        f"cannot be created: no permission to write in {locked}")
    assert messages["check", open_to_all] is None  # the same user may write elsewhere
    assert os.listdir(locked) == []


def test_a_run_lock_that_is_a_folder(tmp_path):
    (tmp_path / LOCK_FILE).mkdir()
    with pytest.raises(UserError) as raised:
        RunLock(str(tmp_path)).acquire()
    assert str(raised.value) == (f"{tmp_path / LOCK_FILE} is not a regular file, so it cannot lock "
                                 f"--model_dir={tmp_path}; remove it (pnpp_tf creates it afresh) or choose "
                                 "another --model_dir.")


def test_usable_and_remote_paths_pass(tmp_path):
    check_writable_dir(str(tmp_path), "--model_dir")
    check_writable_dir(str(tmp_path / "new" / "deeper"), "--model_dir")
    check_writable_dir("gs://bucket/run", "--model_dir")  # remote: not checked here
    check_writable_file(str(tmp_path / "new" / "photos.npz"), "--index")
    assert os.listdir(tmp_path) == []  # the probe file is gone, and nothing was created


def one_error_line(result, program):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"pnpp_tf.{program}: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0][len(f"pnpp_tf.{program}: error: "):]


# As the user meets them: one program run per program (each costs a TensorFlow import), each a
# different case; the tests above cover every case in every program, in this process.

def test_cli_train_with_a_run_lock_that_is_a_folder(tmp_path):
    (tmp_path / "run" / LOCK_FILE).mkdir(parents=True)
    result = run_module("pnpp_tf.train", f"--model_dir={tmp_path / 'run'}", "--dataset=folder",
                        f"--data_dir={tmp_path}", "--backbone=small_cnn", "--weights=none")
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'run' / LOCK_FILE))} is not a regular file, .*--model_dir\.",
                        one_error_line(result, "train"))
    assert os.listdir(tmp_path / "run") == [LOCK_FILE]


def test_cli_train_on_a_read_only_file_system(read_only):
    result = run_module("pnpp_tf.train", f"--model_dir={read_only / 'existing'}", "--dataset=folder",
                        f"--data_dir={read_only}", "--backbone=small_cnn", "--weights=none")
    assert one_error_line(result, "train") == (f"--model_dir={read_only / 'existing'} is on a read-only file "
                                               "system; choose another --model_dir.")


def test_cli_export_to_a_file(file_in, tmp_path):
    result = run_module("pnpp_tf.export", f"--model_dir={tmp_path}", f"--export_dir={file_in}")
    assert one_error_line(result, "export") == (f"--export_dir={file_in} is a file, not a directory; choose "
                                                "another --export_dir.")


def test_cli_evaluate_under_a_file(file_in, tmp_path):
    result = run_module("pnpp_tf.evaluate", f"--saved_model={tmp_path}", "--dataset=folder",
                        f"--data_dir={tmp_path}", f"--output_dir={file_in / 'out'}")
    assert one_error_line(result, "evaluate") == (f"--output_dir={file_in / 'out'} lies under {file_in}, which "
                                                  "is a file; choose another --output_dir.")


def test_cli_index_on_a_read_only_file_system(read_only, tmp_path):
    index_path = read_only / "existing" / "photos.index"
    result = run_module("pnpp_tf.index", f"--model={tmp_path}", f"--images={tmp_path}", f"--index={index_path}")
    assert one_error_line(result, "index") == (f"--index={index_path} cannot be created: {read_only / 'existing'} "
                                               "is on a read-only file system; choose another --index.")
