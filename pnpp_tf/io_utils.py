"""Files written whole or not at all: a reader (or a crash) never sees half of one.

    with replacing("out/index.npz") as partial:    # a temporary sibling of the file
        write_somehow(partial)                      # renamed onto out/index.npz on success

Paths go through `tf.io.gfile`, so they may be local or remote (e.g. gs://). A remote rename is
a copy and a delete, so there only the finished file is guaranteed whole, not the atomic swap.
"""

import contextlib
import json
import os
import socket
import uuid


@contextlib.contextmanager
def replacing(path):
    """Yields a temporary sibling of `path` to write, then renames it onto `path`.

    The parent directory is created first. If the block raises (a crash, an interrupt), the
    temporary is removed and `path` is left as it was.

    Raises:
        OSError: for the errors of `tf.io.gfile` (which are not OSErrors), raised by the block or
            by the rename, so callers catch one kind of I/O error.
    """
    # Here, not at the top: `pnpp_tf.plots` imports this module and otherwise needs no TensorFlow.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    # Unique per writer: workers on several machines (or in containers, all pid 1) may write the
    # same file at once, e.g. the same image cache entry; each renames its own whole copy.
    temporary = f"{path}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        folder = os.path.dirname(path)
        if folder:
            tf.io.gfile.makedirs(folder)
        yield temporary
        tf.io.gfile.rename(temporary, path, overwrite=True)
    except BaseException as error:
        with contextlib.suppress(tf.errors.OpError):
            if tf.io.gfile.exists(temporary):
                tf.io.gfile.remove(temporary)
        if isinstance(error, tf.errors.OpError):
            raise OSError(f"{path}: {error.message}") from error
        raise


def write_atomic(path, contents):
    """Writes `contents` (bytes, or str as UTF-8) to `path` through `replacing`."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel - see `replacing`

    with replacing(path) as partial, tf.io.gfile.GFile(partial, "wb") as file:
        file.write(contents)


def write_json(path, payload):
    """Writes `payload` as indented JSON, atomically."""
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=True))
