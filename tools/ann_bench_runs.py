"""tools/bench_ann.py's measurements: the exact ground truth, each catalogue's build and searches, the
glyphs model's embeddings, and the worker processes that run them (fresh ones measure memory).

A task is a JSON-able spec run by `dispatch`: in this process, or in a fresh `tools/bench_ann.py
--worker=spec.json` whose result comes back as JSON (arrays as .npy files moved beside --work_dir).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

# tools/machine.py and tools/ann_bench_data.py, beside this file (machine puts the repository on the path).
from machine import Stopwatch, write_json
from ann_bench_data import geometry, list_metrics, read_json, truth_task

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_ann.py")
WORKER_OUTPUT = "--worker_output"
MIN_SINGLE_QUERIES = 5
# Build settings (a catalogue is built again when one changes) and search settings (applied to
# an opened catalogue), as `pnpp_tf.retrieval.ann.AnnParams` fields with their flags.
BUILD_PARAMS = {"connectivity": "hnsw_connectivity", "expansion_add": "hnsw_expansion_add",
                "lists": "ivf_lists", "pq_bytes": "pq_bytes"}
SEARCH_PARAMS = {"expansion_search": "hnsw_expansion_search", "probes": "ivf_probes"}


# ------------------------------------------------------------------------------- ground truth

def ground_truth(args, data):
    """The exact float32 top max(k, R_max) of every query: {"ids", "seconds", "cached"}, cached on disk."""
    depth = max(args.k, data["r_max"])
    path = os.path.join(data["folder"], f"truth-k{depth}.npz")
    if os.path.isfile(path):
        with np.load(path) as saved:
            return {"ids": saved["ids"], "seconds": float(saved["seconds"]), "cached": True}
    spec = {"task": "truth", "gallery": data["gallery"], "queries": data["queries"], "k": depth}
    result = dispatch(args, spec, fresh=args.memory != "none")
    ids = _take(result["ids"])
    np.savez(path, ids=ids, seconds=result["seconds"])
    return {"ids": ids, "seconds": result["seconds"], "cached": False}


# ---------------------------------------------------------------------------- one configuration

def measure_configuration(args, data, truth, reference, backend, dtype):
    """Builds (or reuses) the catalogue of `backend` x `dtype`, measures it; one row."""
    params = build_params(args)
    directory = _catalogue_dir(args, data, backend, dtype, params)
    row = {"backend": backend, "dtype": dtype, "catalogue": directory}
    row["build"] = _build(args, data, backend, dtype, params, directory)
    row["disk_bytes"], row["structure_bytes"] = _disk_bytes(directory)
    row["shards"] = len(read_json(os.path.join(directory, "manifest.json")).get("shards", []))
    serve = {"task": "serve", "catalogue": directory, "backend": backend, "queries": data["queries"], "k": args.k,
             "r_max": data["r_max"], "batch_size": args.batch_size, "single_queries": args.single_queries,
             "single_seconds": args.single_seconds, "search_params": search_params(args), "rescore": args.rescore,
             "threads": args.threads}
    fresh = args.memory != "none"
    timed = dispatch(args, {**serve, "mode": "mmap", "timed": True}, fresh=fresh)
    row["memory"] = {"mmap": timed.pop("memory")}
    if args.memory == "both":
        row["memory"]["loaded"] = dispatch(args, {**serve, "mode": "loaded", "timed": False}, fresh=True)["memory"]
    if not fresh:  # this process' memory is no measurement
        row["memory"] = {"mmap": None}
    ids_k, ids_r = _take(timed.pop("ids_k")), _take(timed.pop("ids_r"))
    row["lists"] = os.path.join(args.work_dir, "lists", data["key"], f"{os.path.basename(directory)}-"
                                f"{_digest({'search': search_params(args), 'rescore': args.rescore})}.npz")
    os.makedirs(os.path.dirname(row["lists"]), exist_ok=True)
    np.savez(row["lists"], ids_k=ids_k, ids_r=ids_r)  # for a later look at what a backend missed
    row.update(timed)
    row["metrics"] = list_metrics(ids_k, ids_r, data, truth["ids"][:, :args.k])
    row["delta"] = {name: row["metrics"][name] - reference[name] for name in reference}
    if not args.keep_catalogues:
        shutil.rmtree(directory, ignore_errors=True)
    m = row["metrics"]
    print(f"   recall@{args.k} {m[f'recall@{args.k}']:.4f}, Recall@1 {m['recall@1']:.4f} "
          f"({row['delta']['recall@1']:+.4f}), MAP@R {m['map@r']:.4f}; single {row['single']['queries_per_second']:.1f} "
          f"q/s, batch {row['batch']['queries_per_second']:.1f} q/s", file=sys.stderr, flush=True)
    return row


def _build(args, data, backend, dtype, params, directory):
    record = os.path.join(directory + ".build.json")
    if args.reuse_catalogues and os.path.isfile(os.path.join(directory, "manifest.json")):
        previous = read_json(record)
        if previous:
            return {**previous, "reused": True}
    shutil.rmtree(directory, ignore_errors=True)
    spec = {"task": "build", "gallery": data["gallery"], "directory": directory, "backend": backend, "dtype": dtype,
            "params": params, "shard_size": args.shard_size, "threads": args.threads,
            "images_root": data["folder"]}
    result = dispatch(args, spec, fresh=args.memory != "none")
    write_json(record, result)
    print(f"   built in {result['seconds']:.1f} s ({result['cpu_seconds']:.1f} CPU s)", file=sys.stderr, flush=True)
    return {**result, "reused": False}


def _build_task(spec):
    from pnpp_tf.retrieval import ann  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval.cataloguing import DEFAULT_SHARD_SIZE, write_catalogue  # pylint: disable=import-outside-toplevel

    if spec["threads"]:
        ann.set_threads(spec["threads"])
    gallery = np.load(spec["gallery"], mmap_mode="r")
    keys = [(f"{i}.jpg", 0, 0) for i in range(len(gallery))]
    params = ann.AnnParams(**spec["params"]) if spec["backend"] != "exact" else None
    before = _memory_status(reset=True)
    with Stopwatch() as clock:
        write_catalogue(spec["directory"], gallery, keys, spec["images_root"], model="bench_ann synthetic",
                        dtype=spec["dtype"], backend=None if spec["backend"] == "exact" else spec["backend"],
                        params=params, shard_size=spec["shard_size"] or DEFAULT_SHARD_SIZE, verbose=0)
    after = _memory_status()
    return {"seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds,
            "peak_rss_bytes": _difference(after.get("VmHWM"), before.get("VmRSS"))}


def _serve_task(spec):
    """In a fresh process: open, (load,) search the query set once; memory; then, if timed, the timings."""
    from pnpp_tf.retrieval import ann  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval.catalogue import Catalogue  # pylint: disable=import-outside-toplevel

    if spec["threads"]:
        ann.set_threads(spec["threads"])
    for module in ("usearch.index", "faiss"):  # what serving may import, in the baseline
        try:
            __import__(module)
        except ImportError:
            pass
    queries = np.load(spec["queries"])
    k, batch, backend, rescore = spec["k"], spec["batch_size"], spec["backend"], spec["rescore"]
    before = _memory_status(reset=True)
    with Stopwatch() as open_clock:
        catalogue = Catalogue.open(spec["catalogue"],
                                   search_settings=spec["search_params"] if backend != "exact" else None)
        if spec["mode"] == "loaded":
            catalogue.read_into_memory(backend)

    def search(rows, depth=k):
        return catalogue.search(rows, depth, backend, None if rescore is None else max(rescore, depth))[1]

    def batched(depth):
        return np.concatenate([search(queries[start:start + batch], depth) for start in range(0, len(queries), batch)])

    if spec["timed"]:  # untimed: the shapes of a batch, the last batch and one query (tracing, compiling)
        for size in sorted({min(batch, len(queries)), len(queries) % batch or batch, 1}):
            search(queries[:size])
    with Stopwatch() as batch_clock:
        ids_k = batched(k)
    after = _memory_status()
    result = {"memory": {"peak_rss_bytes": _difference(after.get("VmHWM"), before.get("VmRSS")),
                         "rss_file_bytes": _difference(after.get("RssFile"), before.get("RssFile")),
                         "rss_anon_bytes": _difference(after.get("RssAnon"), before.get("RssAnon")),
                         "open_seconds": open_clock.seconds, "pass_seconds": batch_clock.seconds}}
    if not spec["timed"]:
        return result
    result["batch"] = {**_rate(len(queries), batch_clock), "batch_size": batch}
    latencies = []
    with Stopwatch() as single_clock:  # --single_queries, or fewer if --single_seconds run out
        loop_start = time.perf_counter()
        for i in range(min(spec["single_queries"], len(queries))):
            start = time.perf_counter()
            again = search(queries[i:i + 1])
            latencies.append(time.perf_counter() - start)
            if not np.array_equal(again[0], ids_k[i]):
                result["repeatable"] = False
            if i + 1 >= MIN_SINGLE_QUERIES and time.perf_counter() - loop_start > spec["single_seconds"]:
                break
    result["single"] = _rate(len(latencies), single_clock, latencies)
    result.setdefault("repeatable", True)
    with Stopwatch() as metric_clock:
        ids_r = batched(spec["r_max"])
    result["metric_search_seconds"] = metric_clock.seconds
    result["backend_used"] = catalogue.resolve_backend(backend)
    result["kind"] = _structure_kind(catalogue, backend)
    for name, ids in (("ids_k", ids_k), ("ids_r", ids_r)):
        result[name] = os.path.join(spec["scratch"], f"{name}.npy")
        np.save(result[name], ids)
    return result


def _rate(count, clock, latencies=None):
    rate = {"queries": count, "seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds,
            "queries_per_second": count / clock.seconds if clock.seconds else float("nan"),
            "cpu_ms_per_query": 1e3 * clock.cpu_seconds / count if count else float("nan")}
    if latencies:
        rate["median_ms"] = 1e3 * float(np.median(latencies))
        rate["p95_ms"] = 1e3 * float(np.percentile(latencies, 95))
    return rate


def _structure_kind(catalogue, backend):
    if backend == "exact":
        return "exact"
    kinds = sorted({structure.kind for structure in catalogue.__dict__.get("_structures", {}).values()})
    return "; ".join(kinds)


# --------------------------------------------------------------------------------------- glyphs

def benchmark_glyphs(args, backends, dtypes):
    """The trained glyphs model's test split, leave-one-out, through every catalogue; or why not."""
    results = read_json(os.path.join(args.glyphs_model, "results.json"))
    data_dir = args.glyphs_data or results.get("flags", {}).get("data_dir") or ""
    if data_dir and not os.path.isabs(data_dir) and not os.path.isdir(data_dir):  # relative to the repository
        data_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), data_dir)
    test_dir = os.path.join(data_dir, "test") if data_dir else ""
    if not os.path.isdir(test_dir):
        return {"error": f"no glyphs test split at {test_dir or '(unknown data_dir)'}: pass --glyphs_data"}
    spec = {"task": "glyphs", "model": args.glyphs_model, "test_dir": test_dir, "backends": backends,
            "dtypes": dtypes, "k": args.k, "params": build_params(args), "search_params": search_params(args),
            "rescore": args.rescore, "work_dir": os.path.join(args.work_dir, "glyphs")}
    print("== glyphs", file=sys.stderr, flush=True)
    try:
        return dispatch(args, spec, fresh=args.memory != "none")
    except WorkerFailed as error:
        return {"error": str(error)}


def _glyphs_task(spec):
    from pnpp_tf.artifacts.embedder import load_embedder  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval import ann  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval.cataloguing import write_catalogue  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval.embed import find_images  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval.metrics import retrieval_metrics  # pylint: disable=import-outside-toplevel

    embedder = load_embedder(spec["model"])
    embedded = embedder.embed_files(find_images(spec["test_dir"]))
    names = [os.path.basename(os.path.dirname(path)) for path in embedded.paths]
    classes = sorted(set(names))
    labels = np.array([classes.index(name) for name in names], np.int64)
    x = embedded.embeddings
    k = spec["k"]
    data = {"query_labels": labels, "gallery_labels": labels, "r": np.bincount(labels)[labels] - 1}
    r_max = int(data["r"].max())
    lists = {}
    shutil.rmtree(spec["work_dir"], ignore_errors=True)
    for backend in spec["backends"]:
        for dtype in spec["dtypes"]:
            directory = os.path.join(spec["work_dir"], f"{backend}-{dtype}")
            params = ann.AnnParams(**spec["params"], **spec["search_params"]) if backend != "exact" else None
            catalogue = write_catalogue(directory, x, [(f"{i}.png", 0, 0) for i in range(len(x))], spec["test_dir"],
                                        dtype=dtype, backend=None if backend == "exact" else backend,
                                        params=params, verbose=0)
            found = {depth: _leave_one_out(catalogue, x, depth, backend, spec["rescore"]) for depth in (k, r_max)}
            lists[backend, dtype] = (found[k], found[r_max], _structure_kind(catalogue, backend))
    shutil.rmtree(spec["work_dir"], ignore_errors=True)
    reference_k, reference_r, _ = lists.get(("exact", "float32")) or (None, None, None)
    if reference_k is None:  # exact float32 not among the rows: found here for the reference
        reference_k = np.stack([_drop_self(row, i, k) for i, row in enumerate(
            _exact_lists(x, k + 1))])
        reference_r = np.stack([_drop_self(row, i, r_max) for i, row in enumerate(_exact_lists(x, r_max + 1))])
    reference = list_metrics(reference_k, reference_r, data)
    check = retrieval_metrics(x, labels, ks=(1,))
    rows = []
    for (backend, dtype), (ids_k, ids_r, kind) in lists.items():
        metrics = list_metrics(ids_k, ids_r, data, reference_k)
        rows.append({"backend": backend, "dtype": dtype, "kind": kind, "metrics": metrics,
                     "delta": {name: metrics[name] - reference[name] for name in reference}})
    return {"model": spec["model"], "test_dir": spec["test_dir"], "items": len(x), "dim": int(x.shape[1]),
            "classes": len(classes), "r_max": r_max, "reference": reference,
            "geometry": geometry(x / np.linalg.norm(x, axis=1, keepdims=True)),
            "retrieval_metrics_check": {"recall@1": check["recall@1"], "map@r": check["map@r"]}, "rows": rows}


def _leave_one_out(catalogue, x, depth, backend, rescore):
    """Each item's `depth` nearest other items (itself dropped), searched in the catalogue."""
    rescore = None if rescore is None else max(rescore, depth + 1)
    ids = np.concatenate([catalogue.search(x[start:start + 64], depth + 1, backend, rescore)[1]
                          for start in range(0, len(x), 64)])
    return np.stack([_drop_self(row, i, depth) for i, row in enumerate(ids)])


def _exact_lists(x, depth):
    from pnpp_tf.retrieval import neighbours  # pylint: disable=import-outside-toplevel

    return neighbours.nearest(x, x, depth)[1]


def _drop_self(row, item, depth):
    kept = row[row != item]
    return kept[:depth]


# ------------------------------------------------------------------------------------- helpers

def build_params(args):
    """The build settings: the flags given, and `AnnParams`' defaults for the rest (so that a
    catalogue built under other defaults is not taken for one of today's)."""
    return _with_defaults(args, BUILD_PARAMS)


def search_params(args):
    """The search settings: the flags given, and `AnnParams`' defaults for the rest."""
    return _with_defaults(args, SEARCH_PARAMS)


def _with_defaults(args, fields):
    from pnpp_tf.retrieval import ann  # pylint: disable=import-outside-toplevel

    defaults = ann.AnnParams().to_json()
    return {field: defaults[field] if getattr(args, flag) is None else getattr(args, flag)
            for field, flag in fields.items()}


def _catalogue_dir(args, data, backend, dtype, params):
    # layout 2: IVF-PQ shards share the first shard's trained quantiser.
    settings = {"params": params if backend != "exact" else {}, "shard_size": args.shard_size, "layout": 2}
    return os.path.join(args.work_dir, "catalogues", data["key"], f"{backend}-{dtype}-{_digest(settings)}")


def _digest(settings):
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def _disk_bytes(directory):
    total = structure = 0
    for folder, _, files in os.walk(directory):
        for name in files:
            size = os.path.getsize(os.path.join(folder, name))
            total += size
            if name.endswith((".usearch", ".faiss")):
                structure += size
    return total, structure


def _memory_status(reset=False):
    """{field: bytes} of /proc/self/status' VmRSS, VmHWM, RssAnon, RssFile; with `reset`, the
    peak (VmHWM) is first reset to the current resident memory (Linux clear_refs 5)."""
    if reset:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as file:
                file.write("5")
        except OSError:
            pass
    status = {}
    try:
        with open("/proc/self/status", encoding="ascii") as file:
            for line in file:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    status[name] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return status


def _take(path):
    """The array a worker saved at `path`, which is then removed."""
    array = np.load(path)
    os.remove(path)
    return array


def _difference(after, before):
    return None if after is None or before is None else after - before


class WorkerFailed(Exception):
    """A worker process failed (or was killed)."""


TASKS = {"truth": truth_task, "build": _build_task, "serve": _serve_task, "glyphs": _glyphs_task}


def dispatch(args, spec, fresh):
    """Runs the task `spec` in a fresh Python process (`fresh`) or in this one; returns its result."""
    os.makedirs(args.work_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="worker_", dir=args.work_dir)
    spec = {**spec, "scratch": scratch}
    try:
        if not fresh:
            result = TASKS[spec["task"]](spec)
        else:
            spec_path, output = os.path.join(scratch, "spec.json"), os.path.join(scratch, "result.json")
            with open(spec_path, "w", encoding="utf-8") as file:
                json.dump(spec, file)
            completed = subprocess.run([sys.executable, TOOL, f"--worker={spec_path}",
                                        f"{WORKER_OUTPUT}={output}"], stdout=sys.stderr, check=False)
            if completed.returncode != 0 or not os.path.isfile(output):
                raise WorkerFailed(f"The {spec['task']} worker failed (exit status {completed.returncode}).")
            result = read_json(output)
        # Arrays the worker saved in its scratch folder move beside it, for the caller to read.
        for name, value in list(result.items()):
            if isinstance(value, str) and value.startswith(scratch + os.sep) and value.endswith(".npy"):
                kept = os.path.join(args.work_dir, f"{spec['task']}-{name}-{os.getpid()}.npy")
                os.replace(value, kept)
                result[name] = kept
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_worker_task(spec_path, output):
    with open(spec_path, encoding="utf-8") as file:
        spec = json.load(file)
    result = TASKS[spec["task"]](spec)
    with open(output, "w", encoding="utf-8") as file:
        json.dump(result, file)

