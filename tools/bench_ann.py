"""Benchmarks the catalogue index's backends: exact, HNSW and IVF-PQ, stored as float32, float16 or int8.

    python tools/bench_ann.py                                      # 1,000,000 x 512, every backend x dtype
    python tools/bench_ann.py --num_items=100000 --output=ann.json
    python tools/bench_ann.py --backends=hnsw --dtypes=float32 --reuse_catalogues --hnsw_expansion_search=128
    python tools/bench_ann.py --glyphs_model=runs/demo             # also the trained glyphs demo's test split

Data: `--num_items` x `--dim` synthetic unit embeddings with class structure, as trained embeddings
have: `--num_items // --class_size` classes (item i is of class i mod classes, so every class holds
`--class_size` items and R, MAP@R's number of relevant items, is that), each item its class' random
unit centre plus isotropic Gaussian noise of norm `--noise` x the centre's, normalised. The queries
are `--num_queries` more items of random classes, held out of the gallery. Written in chunks with a
fixed seed to a float32 .npy under `--work_dir` (reused by later runs), so memory stays bounded.
Isotropic noise in all D dimensions is a hard case for approximate search (trained embeddings
have a lower intrinsic dimension); the default noise puts exact Recall@1 near 0.75 at a million.

Ground truth: the exact top max(k, R) of every query over the float32 rows, found block by block
with `pnpp_tf.retrieval.neighbours.nearest` and cached under `--work_dir`.

For each backend x storage dtype (one row each) the catalogue is written with
`pnpp_tf.retrieval.cataloguing.write_catalogue` (default shard size, the structure included) and
measured:
  - build: wall and CPU seconds of write_catalogue; bytes on disk (and the structure's part);
  - memory, each in a fresh process: the peak resident memory (VmHWM, its peak reset after the
    imports) above the resident memory after the imports, over opening the catalogue and searching
    the whole query set once in batches; and the file-backed part (RssFile) of what it then holds:
      mmap: the catalogue as `Catalogue.open` maps it (pages come from the page cache as they are
      touched; a warm cache here, the files having just been written or searched);
      loaded: every shard's stored rows read into memory (np.array), and for hnsw/ivfpq each
      structure loaded without mapping (usearch `restore(view=False)`, faiss `read_index` without
      IO_FLAG_MMAP_IFC);
  - queries/s: `--single_queries` one-query searches in a loop, and the whole query set in
    batches of `--batch_size`, k = `--k`, in the mmap process after one untimed pass, with the CPU
    time per query (which holds up better than wall time when other jobs share the machine);
  - recall@k: the share of the exact float32 top k found in the backend's top k; and in brackets
    the same share of those of the query's own class (a backend that misses only near-ties of
    other classes loses recall@k but no Recall@1 or MAP@R);
  - Recall@1 (from the k = `--k` lists) and MAP@R (from a search of k = R, the catalogue's default
    re-scoring depth for that k), each also as its difference to the same metric of the exact
    float32 lists: what the backend and the storage cost.
The approximate backends' search settings (`--hnsw_expansion_search`, `--ivf_probes`, `--rescore`)
apply at search time, so with `--reuse_catalogues` they can be varied without building again.

With `--glyphs_model`, a trained model's embeddings of the glyphs test split (labels: the
characters) are a second, real data set: each test image queries all the others (leave-one-out),
and only the recall and metric columns mean anything (1,619 items: HNSW searches its graph near
exhaustively, and a shard of fewer than 9,984 rows gets an exact flat index instead of IVF-PQ).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

# tools/machine.py, beside this script; importing it also puts the repository on the path.
from machine import Stopwatch, describe_machine, machine_info, write_json

BACKENDS = ("exact", "hnsw", "ivfpq")
DTYPES = ("float32", "float16", "int8")
MODES = ("mmap", "loaded")
# Build settings (a catalogue is built again when one changes) and search settings (applied to
# an opened catalogue), as `pnpp_tf.retrieval.ann.AnnParams` fields with their flags.
BUILD_PARAMS = {"connectivity": "hnsw_connectivity", "expansion_add": "hnsw_expansion_add",
                "lists": "ivf_lists", "pq_bytes": "pq_bytes"}
SEARCH_PARAMS = {"expansion_search": "hnsw_expansion_search", "probes": "ivf_probes"}
CHUNK_ROWS = 1 << 16          # rows generated at a time
TRUTH_ROWS = 1 << 17          # gallery rows per exact ground-truth block
DATA_VERSION = 1
WORKER_OUTPUT = "--worker_output"
MIN_SINGLE_QUERIES = 5
TOLERANCE = 0.005  # the largest Recall@1 loss
MB = 2 ** 20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_items", type=int, default=1_000_000, help="Gallery items.")
    parser.add_argument("--dim", type=int, default=512, help="Embedding dimension.")
    parser.add_argument("--num_queries", type=int, default=1000, help="Held-out query items.")
    parser.add_argument("--class_size", type=int, default=50, help="Items per class (R of MAP@R).")
    parser.add_argument("--noise", type=float, default=2.5,
                        help="Norm of each item's noise relative to its class centre's.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic data.")
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "bench_ann"),
                        help="Where the data, ground truth and catalogues are written (and reused).")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="Comma-separated, of exact, hnsw, ivfpq.")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="Comma-separated storage dtypes.")
    parser.add_argument("--k", type=int, default=10, help="Neighbours per search (recall@k).")
    parser.add_argument("--single_queries", type=int, default=200, help="One-query searches timed.")
    parser.add_argument("--single_seconds", type=float, default=60.0,
                        help="Stop the one-query loop after this many seconds (after at least 5 queries).")
    parser.add_argument("--batch_size", type=int, default=64, help="Queries per batched search.")
    parser.add_argument("--shard_size", type=int, default=0, help="Rows per shard; 0: the catalogue's default.")
    parser.add_argument("--threads", type=int, default=0, help="ANN library threads; 0: all cores.")
    for field, flag in {**BUILD_PARAMS, **SEARCH_PARAMS}.items():
        parser.add_argument(f"--{flag}", type=int, default=None, help=f"AnnParams.{field}; default: AnnParams'.")
    parser.add_argument("--rescore", type=int, default=None,
                        help="Candidates re-scored per query and shard; default: the catalogue's max(10 k, 100).")
    parser.add_argument("--memory", choices=("both", "mmap", "none"), default="both",
                        help="Fresh processes measuring memory: mmap and loaded, mmap only, or none (everything "
                             "in this process, no memory figures: for smoke tests).")
    parser.add_argument("--reuse_catalogues", action="store_true",
                        help="Reuse catalogues an earlier run built from the same data and build settings "
                             "(their recorded build time is reported); otherwise every catalogue is built anew.")
    parser.add_argument("--keep_catalogues", action="store_true",
                        help="Keep the catalogues under --work_dir (they take several GB at a million items).")
    parser.add_argument("--glyphs_model", default="", help="A trained glyphs model (a run's model_dir): also "
                        "benchmark its embeddings of the glyphs test split.")
    parser.add_argument("--glyphs_data", default="", help="The glyphs data_dir; default: the one the run's "
                        "results.json names.")
    parser.add_argument("--output", "--json", dest="output", default="",
                        help="Also write the machine, the data and the rows to this JSON file.")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument(WORKER_OUTPUT, dest="worker_output", default="", help=argparse.SUPPRESS)
    parser.add_argument("--from_results", default="",
                        help="Comma-separated results files of earlier runs on the same data: print (and with "
                             "--output write) their rows as one table, measuring nothing.")
    args = parser.parse_args(argv)
    if args.worker:
        _run_worker_task(args.worker, args.worker_output)
        return
    if args.from_results:
        report = merge_results(args.from_results.split(","))
        print(format_report(report))
        if args.output:
            write_json(args.output, report)
        return
    backends, dtypes = _choices(parser, args.backends, BACKENDS), _choices(parser, args.dtypes, DTYPES)
    if min(args.num_items, args.dim, args.num_queries, args.class_size, args.k, args.batch_size) < 1:
        parser.error("--num_items, --dim, --num_queries, --class_size, --k and --batch_size must be positive.")
    if args.class_size > args.num_items or args.k > args.num_items:
        parser.error("--class_size and --k must not exceed --num_items.")

    started = time.time()
    load_before = os.getloadavg()
    machine = _machine()
    print(f"Machine: {describe_machine(machine)}; usearch {machine['usearch']}, faiss {machine['faiss']}, "
          f"numpy {machine['numpy']}.", file=sys.stderr, flush=True)
    data = make_data(args)
    truth = ground_truth(args, data)
    reference = list_metrics(truth["ids"][:, :args.k], truth["ids"][:, :data["r_max"]], data)
    print(f"Exact float32 ground truth: Recall@1 {reference['recall@1']:.4f}, MAP@R {reference['map@r']:.4f} "
          f"({truth['seconds']:.1f} s{', cached' if truth['cached'] else ''})", file=sys.stderr, flush=True)

    rows = []
    for backend in backends:
        for dtype in dtypes:
            print(f"== {backend} {dtype}", file=sys.stderr, flush=True)
            try:
                rows.append(measure_configuration(args, data, truth, reference, backend, dtype))
            except WorkerFailed as error:  # the other configurations are still measured
                print(f"   {error}", file=sys.stderr, flush=True)
                rows.append({"backend": backend, "dtype": dtype, "error": str(error)})
    glyphs = benchmark_glyphs(args, backends, dtypes) if args.glyphs_model else None
    load_after = os.getloadavg()
    targets = check_targets(rows, args.k)
    report = {
        "machine": machine, "command": _command_line(argv),
        "data": {key: value for key, value in data.items() if not isinstance(value, np.ndarray)},
        "reference": reference, "ann_defaults": _ann_defaults(), "settings": _settings(args),
        "load_average": {"before": load_before[0], "after": load_after[0]},
        "wall_seconds": time.time() - started, "targets": targets, "rows": rows, "glyphs": glyphs,
    }
    print(format_report(report))
    if args.output:
        write_json(args.output, report)


# -------------------------------------------------------------------------------------------- data

def make_data(args):
    """The synthetic gallery (.npy, float32 unit rows), queries and labels under --work_dir, made once.

    Returns:
        A dict: "gallery" (path), "queries" (path), "query_labels" (int64 [Q]), "classes",
        "r" (int64 [Q], each query's relevant gallery items), "r_max", and the settings.
    """
    classes = max(1, args.num_items // args.class_size)
    key = f"n{args.num_items}-d{args.dim}-c{args.class_size}-noise{args.noise:g}-q{args.num_queries}-seed{args.seed}"
    folder = os.path.join(args.work_dir, "data", key)
    done = os.path.join(folder, "done.json")
    files = {name: os.path.join(folder, f"{name}.npy") for name in ("gallery", "queries", "query_labels")}
    if not _read_json(done).get("version") == DATA_VERSION:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        with Stopwatch() as clock:
            _write_data(args, classes, files)
        write_json(done, {"version": DATA_VERSION, "seconds": clock.seconds})
        print(f"Wrote {args.num_items:,} x {args.dim} synthetic embeddings in {clock.seconds:.1f} s to {folder}",
              file=sys.stderr, flush=True)
    query_labels = np.load(files["query_labels"])
    sizes = np.bincount(np.arange(args.num_items) % classes, minlength=classes)
    r = sizes[query_labels].astype(np.int64)
    return {"key": key, "folder": folder, "gallery": files["gallery"], "queries": files["queries"],
            "query_labels": query_labels, "classes": classes, "r": r, "r_max": int(r.max()),
            "num_items": args.num_items, "dim": args.dim, "num_queries": args.num_queries,
            "class_size": args.class_size, "noise": args.noise, "seed": args.seed,
            "gallery_bytes": args.num_items * args.dim * 4}


def _write_data(args, classes, files):
    rng = np.random.default_rng([args.seed, 0])
    centres = _unit(rng.standard_normal((classes, args.dim), dtype=np.float32))
    scale = np.float32(args.noise / np.sqrt(args.dim))

    def items(labels, stream):
        noise = np.random.default_rng([args.seed, *stream]).standard_normal((len(labels), args.dim), dtype=np.float32)
        return _unit(centres[labels] + scale * noise)

    partial = files["gallery"] + ".partial.npy"
    gallery = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(args.num_items, args.dim))
    for number, start in enumerate(range(0, args.num_items, CHUNK_ROWS)):
        labels = np.arange(start, min(start + CHUNK_ROWS, args.num_items)) % classes
        gallery[start:start + len(labels)] = items(labels, (1, number))
    gallery.flush()
    del gallery
    os.replace(partial, files["gallery"])
    query_labels = np.random.default_rng([args.seed, 2]).integers(0, classes, args.num_queries).astype(np.int64)
    np.save(files["queries"], items(query_labels, (3,)))
    np.save(files["query_labels"], query_labels)


def _unit(x):
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def ground_truth(args, data):
    """The exact float32 top max(k, R_max) of every query: {"ids", "seconds", "cached"}, cached on disk."""
    depth = max(args.k, data["r_max"])
    path = os.path.join(data["folder"], f"truth-k{depth}.npz")
    if os.path.isfile(path):
        with np.load(path) as saved:
            return {"ids": saved["ids"], "seconds": float(saved["seconds"]), "cached": True}
    spec = {"task": "truth", "gallery": data["gallery"], "queries": data["queries"], "k": depth}
    result = _dispatch(args, spec, fresh=args.memory != "none")
    ids = _take(result["ids"])
    np.savez(path, ids=ids, seconds=result["seconds"])
    return {"ids": ids, "seconds": result["seconds"], "cached": False}


def _truth_task(spec):
    from pnpp_tf.retrieval import neighbours  # pylint: disable=import-outside-toplevel

    gallery = np.load(spec["gallery"], mmap_mode="r")
    queries = np.load(spec["queries"])
    k = spec["k"]
    best_scores = best_ids = None
    with Stopwatch() as clock:
        for start in range(0, len(gallery), TRUTH_ROWS):
            block = np.asarray(gallery[start:start + TRUTH_ROWS])
            scores, ids = neighbours.nearest(queries, block, min(k, len(block)), backend="exact")
            ids = ids + start
            if best_ids is not None:
                scores, ids = np.concatenate([best_scores, scores], 1), np.concatenate([best_ids, ids], 1)
            order = np.lexsort((ids, -scores), axis=-1)[:, :k]  # the catalogue's order: score desc, item asc
            best_scores, best_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    out = os.path.join(spec["scratch"], "truth.npy")
    np.save(out, best_ids)
    return {"ids": out, "seconds": clock.seconds}


# ----------------------------------------------------------------------------------------- metrics

def list_metrics(ids_k, ids_r, data, truth_k=None):
    """Recall@1 (from `ids_k`), MAP@R (from `ids_r`) and, given `truth_k`, recall@k against it.

    Args:
        ids_k: int [Q, k] each query's neighbours, best first (-1: none).
        ids_r: int [Q, >= R_max] the same, at least each query's R long.
        data: `make_data`'s dict (the labels).
        truth_k: int [Q, k] the exact lists.
    """
    labels = gallery_labels(data)
    metrics = {"recall@1": recall_at_1(ids_k, data["query_labels"], labels),
               "map@r": map_at_r(ids_r, data["query_labels"], labels, data["r"])}
    if truth_k is not None:
        metrics[f"recall@{ids_k.shape[1]}"] = recall_against(ids_k, truth_k)
        # The same, counting only the exact top k's items of the query's own class: a backend may
        # miss near-ties of other classes, which cost recall@k but no Recall@1 or MAP@R.
        same = _label_of(truth_k, labels) == data["query_labels"][:, None]
        metrics[f"same_class_recall@{ids_k.shape[1]}"] = recall_against(ids_k, truth_k, same)
    return metrics


def gallery_labels(data):
    """The gallery items' labels: item i is of class i mod classes (or the given labels)."""
    if "gallery_labels" in data:
        return data["gallery_labels"]
    return np.arange(data["num_items"], dtype=np.int64) % data["classes"]


def _label_of(ids, labels):
    """The labels of the items `ids`; -1 (no item) gets a label no query has."""
    ids = np.asarray(ids, np.int64)
    return np.where(ids >= 0, labels[np.maximum(ids, 0)], np.iinfo(np.int64).min)


def recall_at_1(ids, query_labels, labels):
    """Share of queries whose first neighbour shares their label."""
    return float(np.mean(_label_of(ids[:, 0], labels) == query_labels))


def map_at_r(ids, query_labels, labels, r):
    """MAP@R (Musgrave et al. 2020): for each query with R relevant gallery items, the mean over its
    first R positions i of precision@i at the positions holding a relevant item, divided by R."""
    ap = []
    for row, label, count in zip(ids, query_labels, r):
        if count == 0:
            continue  # no relevant item: left out, as pnpp_tf.retrieval.metrics does
        relevant = _label_of(row[:count], labels) == label
        precision = np.cumsum(relevant) / np.arange(1, count + 1)
        ap.append(np.sum(precision[relevant]) / count)
    return float(np.mean(ap)) if ap else float("nan")


def recall_against(ids, truth, counted=None):
    """Share of the exact top-k items (`truth`) found in the top k (`ids`), over all queries;
    only the items where bool `counted` [Q, k] is True, if given (averaged over those items)."""
    counted = np.ones(truth.shape, bool) if counted is None else counted
    found = np.array([[item in set(a[a >= 0].tolist()) for item in b] for a, b in zip(ids, truth)], bool)
    return float(found[counted].mean()) if counted.any() else float("nan")


# ---------------------------------------------------------------------------- one configuration

def measure_configuration(args, data, truth, reference, backend, dtype):
    """Builds (or reuses) the catalogue of `backend` x `dtype`, measures it; one row."""
    params = _build_params(args)
    directory = _catalogue_dir(args, data, backend, dtype, params)
    row = {"backend": backend, "dtype": dtype, "catalogue": directory}
    row["build"] = _build(args, data, backend, dtype, params, directory)
    row["disk_bytes"], row["structure_bytes"] = _disk_bytes(directory)
    row["shards"] = len(_read_json(os.path.join(directory, "manifest.json")).get("shards", []))
    serve = {"task": "serve", "catalogue": directory, "backend": backend, "queries": data["queries"], "k": args.k,
             "r_max": data["r_max"], "batch_size": args.batch_size, "single_queries": args.single_queries,
             "single_seconds": args.single_seconds, "search_params": _search_params(args), "rescore": args.rescore,
             "threads": args.threads}
    fresh = args.memory != "none"
    timed = _dispatch(args, {**serve, "mode": "mmap", "timed": True}, fresh=fresh)
    row["memory"] = {"mmap": timed.pop("memory")}
    if args.memory == "both":
        row["memory"]["loaded"] = _dispatch(args, {**serve, "mode": "loaded", "timed": False}, fresh=True)["memory"]
    if not fresh:  # this process' memory is no measurement
        row["memory"] = {"mmap": None}
    ids_k, ids_r = _take(timed.pop("ids_k")), _take(timed.pop("ids_r"))
    row["lists"] = os.path.join(args.work_dir, "lists", data["key"], f"{os.path.basename(directory)}-"
                                f"{_digest({'search': _search_params(args), 'rescore': args.rescore})}.npz")
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
        previous = _read_json(record)
        if previous:
            return {**previous, "reused": True}
    shutil.rmtree(directory, ignore_errors=True)
    spec = {"task": "build", "gallery": data["gallery"], "directory": directory, "backend": backend, "dtype": dtype,
            "params": params, "shard_size": args.shard_size, "threads": args.threads,
            "images_root": data["folder"]}
    result = _dispatch(args, spec, fresh=args.memory != "none")
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
        catalogue = Catalogue.open(spec["catalogue"])
        if backend != "exact":  # the search settings, in the opened manifest only
            catalogue.manifest["approximate"]["params"].update(spec["search_params"])
        if spec["mode"] == "loaded":
            _load_into_memory(catalogue, backend)
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


def _load_into_memory(catalogue, backend):
    """"loaded": each shard's stored rows (and int8 scales) read into memory, and the structures
    read whole (not mapped) into the catalogue's structure cache before its first search."""
    from pnpp_tf.retrieval import ann  # pylint: disable=import-outside-toplevel

    for shard in catalogue.shards:
        shard.embeddings = np.array(shard.embeddings)
        if shard.scales is not None:
            shard.scales = np.array(shard.scales)
    if backend == "exact":
        return
    params = ann.AnnParams.from_json(catalogue.manifest["approximate"]["params"])
    cache = catalogue.__dict__.setdefault("_structures", {})  # what Catalogue._structure fills
    for shard in catalogue.shards:
        cache[shard.directory] = ann.Structure.load(backend, shard.structure_path(backend), mmap=False, params=params)


def _structure_kind(catalogue, backend):
    if backend == "exact":
        return "exact"
    kinds = sorted({structure.kind for structure in catalogue.__dict__.get("_structures", {}).values()})
    return "; ".join(kinds)


# --------------------------------------------------------------------------------------- glyphs

def benchmark_glyphs(args, backends, dtypes):
    """The trained glyphs model's test split, leave-one-out, through every catalogue; or why not."""
    results = _read_json(os.path.join(args.glyphs_model, "results.json"))
    data_dir = args.glyphs_data or results.get("flags", {}).get("data_dir") or ""
    if data_dir and not os.path.isabs(data_dir) and not os.path.isdir(data_dir):  # relative to the repository
        data_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), data_dir)
    test_dir = os.path.join(data_dir, "test") if data_dir else ""
    if not os.path.isdir(test_dir):
        return {"error": f"no glyphs test split at {test_dir or '(unknown data_dir)'}: pass --glyphs_data"}
    spec = {"task": "glyphs", "model": args.glyphs_model, "test_dir": test_dir, "backends": backends,
            "dtypes": dtypes, "k": args.k, "params": _build_params(args), "search_params": _search_params(args),
            "rescore": args.rescore, "work_dir": os.path.join(args.work_dir, "glyphs")}
    print("== glyphs", file=sys.stderr, flush=True)
    try:
        return _dispatch(args, spec, fresh=args.memory != "none")
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


# ----------------------------------------------------------------------------------- targets

def check_targets(rows, k):
    """The issue's targets, each with the rows it was judged on and whether it is met.

    "Recall@1 within 0.005" is read as a loss of at most 0.005: an approximate list can score
    higher than the exact one (a shortlist that misses a near-tie of another class); the
    difference itself is in each target's figures.
    """
    by = {(row["backend"], row["dtype"]): row for row in rows if "error" not in row}
    targets = []
    exact = by.get(("exact", "float32"))
    for backend in ("hnsw", "ivfpq"):
        row = by.get((backend, "float32"))
        if not row:
            continue
        speedup = (row["single"]["queries_per_second"] / exact["single"]["queries_per_second"]) if exact else None
        recall = row["metrics"][f"recall@{k}"]
        delta = row["delta"]["recall@1"]
        targets.append({"target": f"{backend} float32: recall@{k} >= 0.95, Recall@1 at most 0.005 below exact's, "
                                  ">= 10x exact's single-query throughput",
                        f"recall@{k}": recall, "recall@1_delta": delta, "single_speedup": speedup,
                        "met": bool(recall >= 0.95 and delta >= -TOLERANCE and speedup is not None
                                    and speedup >= 10)})
    for backend in BACKENDS:
        base = by.get((backend, "float32"))
        for dtype in ("float16", "int8"):
            row = by.get((backend, dtype))
            if base and row:
                delta = row["metrics"]["recall@1"] - base["metrics"]["recall@1"]
                targets.append({"target": f"{backend} {dtype}: Recall@1 at most 0.005 below {backend} float32's",
                                "recall@1_delta": delta, "met": bool(delta >= -TOLERANCE)})
    return targets


# ------------------------------------------------------------------------------------- report

def merge_results(paths):
    """One report of the rows of several results files of the same data (a later row of a backend
    and dtype replaces an earlier one), its targets judged again."""
    reports = []
    for path in paths:
        with open(path, encoding="utf-8") as file:
            reports.append(json.load(file))
    keys = {report["data"]["key"] for report in reports}
    if len(keys) > 1:
        raise SystemExit(f"--from_results: the files are of different data ({', '.join(sorted(keys))}).")
    rows = {}
    for report in reports:
        for row in report["rows"]:
            rows[row["backend"], row["dtype"]] = row
    order = {name: number for number, name in enumerate(BACKENDS + DTYPES)}
    merged = sorted(rows.values(), key=lambda row: (order[row["backend"]], order[row["dtype"]]))
    last = reports[-1]
    return {**last, "command": [report["command"] for report in reports], "rows": merged,
            "wall_seconds": sum(report["wall_seconds"] for report in reports),
            "load_average": {"before": reports[0]["load_average"]["before"], "after": last["load_average"]["after"]},
            "targets": check_targets(merged, last["settings"]["k"]),
            "glyphs": next((report["glyphs"] for report in reversed(reports) if report.get("glyphs")), None)}


def format_report(report):
    """The rows as a Markdown table, with the data, the reference, the targets and the machine."""
    data, k = report["data"], report["settings"]["k"]
    exact_single = {row["dtype"]: row["single"]["queries_per_second"] for row in report["rows"]
                    if row["backend"] == "exact" and "error" not in row}
    lines = [f"| backend | storage | build s | disk MB (structure) | RSS mmap MB (file-backed) | RSS loaded MB "
             f"| single q/s (× exact) | CPU ms/query | batch-{report['settings']['batch_size']} q/s "
             f"| recall@{k} (same class) | Recall@1 (Δ) | MAP@R (Δ) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['backend']} | {row['dtype']} | {row['error']} |" + " |" * 9)
            continue
        build = row["build"]
        mmap = row["memory"].get("mmap")
        loaded = row["memory"].get("loaded")
        single, batch, m, d = row["single"], row["batch"], row["metrics"], row["delta"]
        ratio = single["queries_per_second"] / exact_single["float32"] if "float32" in exact_single else None
        lines.append(
            f"| {row['backend']} | {row['dtype']} | {build['seconds']:.1f}{' (reused)' if build.get('reused') else ''} "
            f"| {row['disk_bytes'] / MB:,.0f} ({row['structure_bytes'] / MB:,.0f}) "
            f"| {_mb(mmap, 'peak_rss_bytes')} ({_mb(mmap, 'rss_file_bytes')}) | {_mb(loaded, 'peak_rss_bytes')} "
            f"| {single['queries_per_second']:,.1f}{f' ({ratio:.1f}×)' if ratio else ''} "
            f"| {single['cpu_ms_per_query']:.2f} | {batch['queries_per_second']:,.1f} | {m[f'recall@{k}']:.4f}"
            f"{_same_class(m, k)} "
            f"| {m['recall@1']:.4f} ({d['recall@1']:+.4f}) | {m['map@r']:.4f} ({d['map@r']:+.4f}) |")
    ref = report["reference"]
    lines += ["", f"Data: {data['num_items']:,} × {data['dim']} synthetic unit embeddings, {data['classes']:,} classes "
              f"of {data['class_size']} (R = {data['r_max']}), noise {data['noise']:g}; {data['num_queries']:,} held-out "
              f"queries, k = {k}. Exact float32 reference: Recall@1 {ref['recall@1']:.4f}, MAP@R {ref['map@r']:.4f}; "
              "Δ = difference to it.",
              f"ANN settings: {json.dumps(report['settings']['ann'])}; defaults {json.dumps(report['ann_defaults'])}; "
              f"rescore {report['settings']['rescore'] or 'default max(10 k, 100)'}; shards of "
              f"{report['settings']['shard_size'] or 'the default'} rows.",
              f"Load average (1 min) before {report['load_average']['before']:.1f}, after "
              f"{report['load_average']['after']:.1f} on {report['machine']['cores']} cores (other jobs share the "
              f"machine). Whole run: {report['wall_seconds'] / 60:.1f} min."]
    if report["targets"]:
        lines += ["", "Targets:"]
        for target in report["targets"]:
            figures = ", ".join(f"{name} {value:+.4f}" if "delta" in name else f"{name} {value:.4f}"
                                for name, value in target.items() if name not in ("target", "met") and value is not None)
            lines.append(f"- {target['target']}: {'met' if target['met'] else 'NOT met'} ({figures})")
    glyphs = report.get("glyphs")
    if glyphs:
        lines.append("")
        if "error" in glyphs:
            lines.append(f"Glyphs: skipped: {glyphs['error']}")
        else:
            gref = glyphs["reference"]
            lines += [f"Glyphs test split ({glyphs['items']:,} items, {glyphs['dim']}-d, {glyphs['classes']} classes, "
                      f"leave-one-out; exact float32: Recall@1 {gref['recall@1']:.4f}, MAP@R {gref['map@r']:.4f}; "
                      f"pnpp_tf.retrieval.metrics gives {glyphs['retrieval_metrics_check']['recall@1']:.4f}, "
                      f"{glyphs['retrieval_metrics_check']['map@r']:.4f}):", "",
                      f"| backend | storage | structure | recall@{k} | Recall@1 (Δ) | MAP@R (Δ) |",
                      "|---|---|---|---|---|---|"]
            for row in glyphs["rows"]:
                m, d = row["metrics"], row["delta"]
                lines.append(f"| {row['backend']} | {row['dtype']} | {row['kind']} | {m[f'recall@{k}']:.4f} "
                             f"| {m['recall@1']:.4f} ({d['recall@1']:+.4f}) | {m['map@r']:.4f} ({d['map@r']:+.4f}) |")
    lines += ["", f"Machine: {describe_machine(report['machine'])}; usearch {report['machine']['usearch']}, "
              f"faiss {report['machine']['faiss']}, numpy {report['machine']['numpy']}."]
    return "\n".join(lines)


def _same_class(metrics, k):
    value = metrics.get(f"same_class_recall@{k}")
    return "" if value is None else f" ({value:.4f})"


def _mb(memory, name):
    if not memory or memory.get(name) is None:
        return "–"
    return f"{memory[name] / MB:,.0f}"


# ------------------------------------------------------------------------------------- helpers

def _machine():
    versions = {}
    for module in ("usearch", "faiss", "numpy", "tensorflow"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "not installed"
    return machine_info(tensorflow=versions.pop("tensorflow"), **versions)


def _ann_defaults():
    from pnpp_tf.retrieval import ann  # pylint: disable=import-outside-toplevel

    return ann.AnnParams().to_json()


def _settings(args):
    return {"k": args.k, "batch_size": args.batch_size, "single_queries": args.single_queries,
            "single_seconds": args.single_seconds,
            "shard_size": args.shard_size, "rescore": args.rescore, "threads": args.threads or os.cpu_count(),
            "ann": {**_build_params(args), **_search_params(args)}, "memory": args.memory}


def _build_params(args):
    return {field: getattr(args, flag) for field, flag in BUILD_PARAMS.items() if getattr(args, flag) is not None}


def _search_params(args):
    return {field: getattr(args, flag) for field, flag in SEARCH_PARAMS.items() if getattr(args, flag) is not None}


def _catalogue_dir(args, data, backend, dtype, params):
    settings = {"params": params if backend != "exact" else {}, "shard_size": args.shard_size}
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


def _choices(parser, text, allowed):
    chosen = [item for item in text.split(",") if item]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        parser.error(f"{text!r}: choose among {', '.join(allowed)}.")
    return chosen


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}


def _command_line(argv):
    relative = os.path.relpath(os.path.abspath(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return " ".join(["python", relative, *(sys.argv[1:] if argv is None else argv)])


class WorkerFailed(Exception):
    """A worker process failed (or was killed)."""


TASKS = {"truth": _truth_task, "build": _build_task, "serve": _serve_task, "glyphs": _glyphs_task}


def _dispatch(args, spec, fresh):
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
            completed = subprocess.run([sys.executable, os.path.abspath(__file__), f"--worker={spec_path}",
                                        f"{WORKER_OUTPUT}={output}"], stdout=sys.stderr, check=False)
            if completed.returncode != 0 or not os.path.isfile(output):
                raise WorkerFailed(f"The {spec['task']} worker failed (exit status {completed.returncode}).")
            result = _read_json(output)
        # Arrays the worker saved in its scratch folder move beside it, for the caller to read.
        for name, value in list(result.items()):
            if isinstance(value, str) and value.startswith(scratch + os.sep) and value.endswith(".npy"):
                kept = os.path.join(args.work_dir, f"{spec['task']}-{name}-{os.getpid()}.npy")
                os.replace(value, kept)
                result[name] = kept
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_worker_task(spec_path, output):
    with open(spec_path, encoding="utf-8") as file:
        spec = json.load(file)
    result = TASKS[spec["task"]](spec)
    with open(output, "w", encoding="utf-8") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main()
