"""Files written whole or not at all: a reader (or a crash) never sees half of one.

    with replacing("out/index.npz") as partial:    # a temporary sibling of the file
        write_somehow(partial)                      # renamed onto out/index.npz on success
    with replacing_dir("export/3") as partial:      # a directory artefact (a SavedModel version)
        tf.saved_model.save(module, partial)
    save_keras_atomic(embedder, "run/embedder.keras")

A full disk raises `OutOfSpaceError`, one line naming the path, the space needed and the space
free, and leaves nothing half written.

Paths go through `tf.io.gfile`, so they may be local or remote (e.g. gs://). A remote rename is
a copy and a delete, so there only the finished file is guaranteed whole, not the atomic swap.
"""

import contextlib
import errno
import json
import os
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
    # Here, not at the top: `pnpp_tf.plots` imports this module and otherwise needs no TensorFlow.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    with _renamed_into_place(path, _temporary_name(path, suffix), needed_bytes, tf.io.gfile.remove,
                             overwrite=True) as temporary:
        yield temporary


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
    import tensorflow as tf  # pylint: disable=import-outside-toplevel - see `replacing`

    with _renamed_into_place(path, _temporary_name(path), needed_bytes, tf.io.gfile.rmtree,
                             overwrite=False) as temporary:
        yield temporary


@contextlib.contextmanager
def _renamed_into_place(path, temporary, needed_bytes, remove, overwrite):
    """The shared body of `replacing` and `replacing_dir`: `remove` deletes a failed temporary."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel - see `replacing`

    try:
        _make_parent(path)
        yield temporary
        tf.io.gfile.rename(temporary, path, overwrite=overwrite)
    except BaseException as error:
        with contextlib.suppress(tf.errors.OpError):
            if tf.io.gfile.exists(temporary):
                remove(temporary)
        _raise_as_os_error(error, path, temporary, needed_bytes)


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
