"""Files written whole or not at all: a reader (or a crash) never sees half of one.

    with replacing("out/index.npz") as partial:    # a temporary sibling of the file
        write_somehow(partial)                      # renamed onto out/index.npz on success
    with replacing_dir("export/3") as partial:      # a directory artefact (a SavedModel version)
        tf.saved_model.save(module, partial)
    save_keras_atomic(embedder, "run/embedder.keras")

A full disk raises `OutOfSpaceError`, one line naming the path, the space needed and the space
free, and leaves nothing half written.

An artefact of several parts that must appear together (an export version) stages each part and
publishes them in the order its readers need:

    parts = [Staged("export/tflite/3", directory=True), Staged("export/3", directory=True)]
    ...fill each part.temporary inside `with part.writing():`, check them...
    for part in parts: part.publish()          # or part.discard()

Temporary names end in `.partial-<host>-<pid>-<8 hex digits>` (`is_temporary_name`), so the
leftovers of a killed writer can be recognised and removed by the next one.

Paths go through `tf.io.gfile`, so they may be local or remote (e.g. gs://). A remote rename is
a copy and a delete, so there only the finished file is guaranteed whole, not the atomic swap.

`check_writable_dir` and `check_writable_file` tell the user at start-up, in one line, that an
output path cannot be used (a file, under a file, no permission, a read-only file system).
"""

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import uuid

from pnpp_tf.errors import UserError


class OutOfSpaceError(OSError):
    """A file could not be written whole because its file system is full.

    The message is one line naming the path, the space the write needed (when known) and what is
    free, for the entry points to print as it is.
    """

    def __init__(self, path, needed_bytes=None):
        self.path = path
        self.needed_bytes = needed_bytes
        needed = f" needs about {_megabytes(needed_bytes)}," if needed_bytes else ""
        super().__init__(errno.ENOSPC, f"{path}: no space left on the device:{needed} "
                                       f"{_megabytes(free_bytes(path))} free. Free some space, or write elsewhere.")

    def __str__(self):
        return self.strerror


def free_bytes(path):
    """Bytes free on the file system holding `path` (or its nearest existing parent); None if unknown."""
    folder = os.path.abspath(path)
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_out_of_space(error):
    """True for a full disk as Python (ENOSPC, EDQUOT) or `tf.io.gfile` (ResourceExhausted) reports it."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel - see `replacing`

    if isinstance(error, tf.errors.ResourceExhaustedError):
        return True
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _megabytes(count):
    return "an unknown amount" if count is None else f"{count / 1e6:.1f} MB"


def read_json_object(path, what="file"):
    """The JSON object (a dict) in `path`.

    Args:
        path: a local or remote (`tf.io.gfile`) path.
        what: what the file is, for the message (e.g. "results.json of a training run").

    Raises:
        ValueError: one line naming `path` when it is missing, unreadable, not JSON, or JSON but
            not an object.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel - see `replacing`

    try:
        with tf.io.gfile.GFile(path, "rb") as file:
            payload = json.loads(file.read().decode("utf-8"))
    except tf.errors.NotFoundError as error:
        raise UserError(f"{path}: no such {what}.") from error
    except (tf.errors.OpError, OSError) as error:
        raise UserError(f"{path}: cannot read this {what} ({getattr(error, 'message', error)}).") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: this {what} is not valid JSON ({error}); it may have been cut short. "
                         "Restore or delete it.") from error
    if not isinstance(payload, dict):
        raise UserError(f"{path}: this {what} holds a JSON {type(payload).__name__}, not an object; "
                         "restore or delete it.")
    return payload


@contextlib.contextmanager
def replacing(path, needed_bytes=None, suffix=""):
    """Yields a temporary sibling of `path` to write, then renames it onto `path`.

    Args:
        path: the file to write.
        needed_bytes: its expected size, if known, for the message of a full disk.
        suffix: what the temporary name ends with, for writers that insist on an extension
            (Keras saves only to names ending in ".keras").

    The parent directory is created first. If the block raises (a crash, an interrupt), the
    temporary is removed and `path` is left as it was.

    Raises:
        OutOfSpaceError: the file system filled up (nothing is left behind).
        OSError: for the errors of `tf.io.gfile` (which are not OSErrors), raised by the block or
            by the rename, so callers catch one kind of I/O error.
    """
    staged = Staged(path, needed_bytes, suffix)
    with staged.writing() as temporary:
        yield temporary
    staged.publish()


@contextlib.contextmanager
def replacing_dir(path, needed_bytes=None):
    """Yields a temporary sibling directory name to create and fill, then renames it to `path`.

    For directory artefacts such as a SavedModel version, which a watcher (TF Serving) must never
    see half written. A directory cannot be swapped for another in one rename, so `path` must not
    exist yet. Local paths only: object stores (gs://) do not rename directories.

    Args:
        path: the directory to produce.
        needed_bytes: its expected size, if known, for the message of a full disk.

    Raises:
        OutOfSpaceError: the file system filled up (the temporary directory is removed).
        OSError: `path` exists already, or another error of `tf.io.gfile`.
    """
    staged = Staged(path, needed_bytes, directory=True)
    with staged.writing() as temporary:
        yield temporary
    staged.publish()


class Staged:
    """A file or directory written under a temporary name and put in place by `publish`.

    `replacing` and `replacing_dir` are a `Staged` published at the end of their block; use one
    directly when several parts must be written, then checked, then published together.

    Args:
        path: the file or directory to produce.
        needed_bytes: its expected size, if known, for the message of a full disk.
        suffix: what the temporary name ends with (see `replacing`).
        directory: True for a directory, which `publish` never renames over an existing one
            (local paths only); False for a file, which replaces an existing one.

    Attributes:
        temporary: the name to write (a sibling of `path`; see `is_temporary_name`).
    """

    def __init__(self, path, needed_bytes=None, suffix="", directory=False):
        self.path = path
        self.temporary = _temporary_name(path, suffix)
        self.needed_bytes = needed_bytes
        self.directory = directory
        self.published = False

    @contextlib.contextmanager
    def writing(self):
        """The block that fills `temporary`, after its parent directory is created.

        Raises:
            As `replacing`: an error of the block removes the temporary, a full disk becomes an
            `OutOfSpaceError` and an error of `tf.io.gfile` an OSError, both naming `path`.
        """
        try:
            _make_parent(self.path)
            yield self.temporary
        except BaseException as error:
            self.discard()
            _raise_as_os_error(error, self.path, self.temporary, self.needed_bytes)

    def publish(self):
        """Renames `temporary` to `path`; on failure removes it and raises as `writing` does."""
        import tensorflow as tf  # pylint: disable=import-outside-toplevel - see `discard`

        try:
            tf.io.gfile.rename(self.temporary, self.path, overwrite=not self.directory)
        except BaseException as error:
            self.discard()
            _raise_as_os_error(error, self.path, self.temporary, self.needed_bytes)
        self.published = True

    def discard(self):
        """Removes the temporary if it exists and was not published; never raises."""
        # Here, not at the top: `pnpp_tf.plots` imports this module and otherwise needs no TensorFlow.
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        if self.published:
            return
        with contextlib.suppress(tf.errors.OpError):
            if tf.io.gfile.exists(self.temporary):
                (tf.io.gfile.rmtree if self.directory else tf.io.gfile.remove)(self.temporary)


def save_keras_atomic(model, path):
    """Saves a Keras model to `path` (a name ending in ".keras") whole or not at all.

    Raises:
        ValueError: `path` does not end in ".keras".
        OutOfSpaceError: the file system filled up; an earlier file at `path` is left as it was.
    """
    if not str(path).endswith(".keras"):
        raise ValueError(f"{path}: a Keras model file's name must end in .keras.")
    with replacing(str(path), variables_bytes(model.weights), suffix=".keras") as partial:
        model.save(partial)


def variables_bytes(variables):
    """The bytes the values of `variables` (Keras or TensorFlow) take: about what saving them needs."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel - see `replacing`

    total = 0
    for variable in variables:
        count = 1
        for dim in variable.shape:
            count *= int(dim or 0)
        total += count * tf.as_dtype(variable.dtype).size
    return total


def _temporary_name(path, suffix=""):
    # Unique per writer: workers on several machines (or in containers, all pid 1) may write the
    # same file at once, e.g. the same image cache entry; each renames its own whole copy.
    return f"{path}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


_TEMPORARY = re.compile(r"\.partial-.+-\d+-[0-9a-f]{8}")


def is_temporary_name(name):
    """True if the file or folder name `name` is one of `_temporary_name`'s (a write in progress,
    or left by a writer that was killed)."""
    return bool(_TEMPORARY.search(os.path.basename(name)))


def _make_parent(path):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel - see `replacing`

    folder = os.path.dirname(path)
    if folder:
        tf.io.gfile.makedirs(folder)


def _raise_as_os_error(error, path, temporary, needed_bytes):
    """Re-raises what a write of `path` through `temporary` raised: a full disk as an
    `OutOfSpaceError` naming `path` (not the temporary, which is gone), a `tf.io.gfile` error as
    an OSError naming `path`, anything else as it is."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel - see `replacing`

    if is_out_of_space(error):
        if not isinstance(error, OutOfSpaceError):
            raise OutOfSpaceError(path, needed_bytes) from error
        if str(error.path).startswith(temporary):
            raise OutOfSpaceError(path, needed_bytes or error.needed_bytes) from error
    if isinstance(error, tf.errors.OpError):
        raise OSError(f"{path}: {error.message}") from error
    raise error


def write_atomic(path, contents):
    """Writes `contents` (bytes, or str as UTF-8) to `path` through `replacing`."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel - see `replacing`

    with replacing(path, len(contents)) as partial, tf.io.gfile.GFile(partial, "wb") as file:
        file.write(contents)


def write_json(path, payload):
    """Writes `payload` as indented JSON, atomically."""
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def check_writable_dir(path, flag, advice=None):
    """Stops at start-up, in one line, when files cannot be created in directory `path`.

    Truthful for root too (whom permission bits do not stop, but a read-only file system does):
    it creates and removes an empty file in `path`, or in its nearest existing parent when `path`
    is still to be created, instead of asking `os.access`.

    Args:
        path: a local directory (it need not exist yet); remote ones ("gs://...") are not checked.
        flag: how the user named it, e.g. "--model_dir".
        advice: what to do, ending the message (default: "choose another <flag>").

    Raises:
        UserError: `path` is a file or lies under one, or no file can be created there (no
            permission, a read-only file system, ...).
    """
    if not path or "://" in str(path):
        return
    problem = _why_unwritable(os.fspath(path))
    if problem:
        raise UserError(f"{flag}={path} {problem}; {advice or f'choose another {flag}'}.")


def check_writable_file(path, flag, advice=None):
    """Like `check_writable_dir`, for a file written through `replacing` (so what matters is its
    folder: a temporary is created there and renamed onto `path`).

    Raises:
        UserError: `path` is a directory, or its folder cannot be written (as `check_writable_dir`).
    """
    if not path or "://" in str(path):
        return
    path = os.fspath(path)
    advice = advice or f"choose another {flag}"
    if os.path.isdir(path):
        raise UserError(f"{flag}={path} is a directory; give a file name there, or {advice}.")
    folder = os.path.dirname(os.path.abspath(path))
    problem = _why_unwritable(folder)
    if problem:
        raise UserError(f"{flag}={path} cannot be written: {folder} {problem}; {advice}.")


def _why_unwritable(path):
    """What stops files being created in directory `path` (a phrase, `path` its subject), or None."""
    if os.path.lexists(path) and not os.path.isdir(path):
        return "is a file, not a directory" if os.path.isfile(path) else "exists and is not a directory"
    folder = os.path.abspath(path)
    while not os.path.lexists(folder):  # the nearest existing parent, where makedirs would start
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"lies under {folder}, which is {'a file' if os.path.isfile(folder) else 'not a directory'}"
    probe = _temporary_name(os.path.join(folder, ".pnpp_tf_write_check"))
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.remove(probe)
    except OSError as error:
        code = errno.EACCES if error.errno == errno.EPERM else error.errno
        if folder == os.path.abspath(path):
            reasons = {errno.EROFS: "is on a read-only file system",
                       errno.EACCES: "is not writable (permission denied)"}
            return reasons.get(code, f"cannot be written ({error.strerror})")
        reasons = {errno.EROFS: f"{folder} is on a read-only file system",
                   errno.EACCES: f"no permission to write in {folder}"}
        return f"cannot be created: {reasons.get(code, f'{folder}: {error.strerror}')}"
    return None
