"""A catalogue update stopped at one moment, or a catalogue searched while its memory is measured.

    python tests/catalogue_child.py build STOP MODEL_DIR IMAGES INDEX SHARD_SIZE
    python tests/catalogue_child.py memory INDEX BACKEND QUERIES.npy K WARM_ROWS

build runs `update_catalogue` (float32, no approximate structure) after a test-only change that
SIGKILLs it while it writes its third shard. STOP is one of:
    before_publish   the third shard's files are written under their temporary name, not renamed
    before_commit    the third shard is in place, but the manifest does not list it yet

memory opens the catalogue and searches it with the queries (float32 .npy) for K neighbours, and
prints one JSON line. First it runs an exact search of a WARM_ROWS-row gallery of the same width
(TensorFlow's start-up and XLA's compilation for shards of that many rows, which are not the
catalogue's memory), then resets the peak resident set to the current one (Linux >= 4.0), and
reads peaks from /proc/self/status (VmHWM): ru_maxrss cannot be reset, as every exiting thread
copies the peak into it. The line: {"reset": whether the peak could be reset, "resident_kb": the
resident set before opening, "before_kb": its peak then, "peak_kb": the peak after searching,
"ru_maxrss_kb": getrusage's, "file_kb_before"/"file_kb_after": the resident pages of mapped files
(RssFile) before opening and after searching, "backend": the one used, "items": the neighbours
found} (sizes in KB).
"""

import json
import os
import resource
import signal
import sys


def build(stop, model_dir, images, index, shard_size):
    from pnpp_tf.artifacts import load_embedder  # pylint: disable=import-outside-toplevel
    from pnpp_tf import io_utils  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval import cataloguing  # pylint: disable=import-outside-toplevel

    embedder = load_embedder(model_dir)
    third = os.path.join(index, "shard-000002")
    if stop == "before_publish":
        publish = io_utils.Staged.publish

        def publish_or_die(self):
            if self.path == third:
                os.kill(os.getpid(), signal.SIGKILL)
            publish(self)

        io_utils.Staged.publish = publish_or_die
    elif stop == "before_commit":
        commit = cataloguing._commit  # pylint: disable=protected-access

        def commit_or_die(directory, manifest):
            if any(entry["name"] == "shard-000002" for entry in manifest["shards"]):
                os.kill(os.getpid(), signal.SIGKILL)
            commit(directory, manifest)

        cataloguing._commit = commit_or_die  # pylint: disable=protected-access
    else:
        raise SystemExit(f"unknown STOP {stop!r}")
    cataloguing.update_catalogue(embedder, images, index, shard_size=int(shard_size), verbose=0)
    raise SystemExit("the update finished: it was never stopped")


def _status_kb(field):
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def memory(index, backend, queries_path, k, warm_rows):
    import numpy as np  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval import neighbours  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval.catalogue import Catalogue  # pylint: disable=import-outside-toplevel

    queries = np.load(queries_path)
    warm = np.random.default_rng(0).normal(size=(int(warm_rows), queries.shape[1])).astype(np.float32)
    neighbours.nearest(queries, warm, int(k))
    del warm
    if backend != "exact":
        from pnpp_tf.retrieval import ann  # pylint: disable=import-outside-toplevel,unused-import
    try:  # the peak so far is the warm-up's: reset it to the resident set
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        reset = True
    except OSError:
        reset = False
    resident, files, before = _status_kb("VmRSS"), _status_kb("RssFile"), _status_kb("VmHWM")
    catalogue = Catalogue.open(index)
    _, items, used = catalogue.search(queries, k=int(k), backend=backend)
    peak = _status_kb("VmHWM")
    print(json.dumps({"reset": reset, "resident_kb": resident, "before_kb": before, "peak_kb": peak,
                      "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "file_kb_before": files, "file_kb_after": _status_kb("RssFile"), "backend": used,
                      "items": items.tolist()}))


if __name__ == "__main__":
    {"build": build, "memory": memory}[sys.argv[1]](*sys.argv[2:])
