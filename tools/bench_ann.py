"""Benchmarks the catalogue index's backends: exact, HNSW and IVF-PQ, stored as float32, float16 or int8.

    python tools/bench_ann.py                                      # 1,000,000 x 512, every backend x dtype
    python tools/bench_ann.py --num_items=100000 --output=ann.json
    python tools/bench_ann.py --backends=hnsw --dtypes=float32 --reuse_catalogues --hnsw_expansion_search=128
    python tools/bench_ann.py --glyphs_model=runs/demo             # also the trained glyphs demo's test split
    python tools/bench_ann.py --intrinsic_dim=0 --num_items=100000 # the hard case: isotropic noise

Data (tools/ann_bench_data.py): `--num_items` x `--dim` synthetic unit embeddings with class
structure, as trained embeddings have: `--num_items // --class_size` classes (item i is of class
i mod classes, so every class holds `--class_size` items and R, MAP@R's number of relevant items,
is that). By default each class varies along `--intrinsic_dim` directions only (its own basis in
a `--signal_dim`-dimensional subspace shared by the classes) with `--noise` the norm of that
variation relative to the centre's, plus isotropic noise of norm `--iso_noise`: a local intrinsic
dimension and relative contrast near trained embeddings'. `--intrinsic_dim=0` is the hard case,
the tool's first data: isotropic Gaussian noise in all D dimensions (default noise 2.5; exact
Recall@1 0.73 at a million). The queries are `--num_queries` more items of random classes, held
out of the gallery. Written in chunks with a fixed seed to a float32 .npy under `--work_dir`
(reused by later runs), so memory stays bounded. The data's local intrinsic dimension (k = 20)
and relative contrast, over 1,000 of its items, head the report; the glyphs' embeddings' head their table.

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
  - queries/s, in the mmap process: the whole query set in batches of `--batch_size` (the pass
    the memory figure covers, after untimed searches of each batch shape), then `--single_queries`
    one-query searches in a loop (fewer if `--single_seconds` run out), k = `--k`; with the CPU
    time per query, which holds up better than wall time when other jobs share the machine;
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
import json
import os
import sys
import tempfile
import time

import numpy as np

# tools/machine.py and the tool's modules, beside this script; importing machine also puts the
# repository on the path.
from machine import describe_machine, machine_info, write_json
import ann_bench_data
from ann_bench_data import (  # noqa: F401 pylint: disable=unused-import (the tests use them from here)
    geometry, gallery_labels, list_metrics, make_data, map_at_r, recall_against, recall_at_1)
from ann_bench_runs import (BUILD_PARAMS, SEARCH_PARAMS, WORKER_OUTPUT, WorkerFailed, benchmark_glyphs,
                            build_params, ground_truth, measure_configuration, run_worker_task, search_params)

BACKENDS = ("exact", "hnsw", "ivfpq")
DTYPES = ("float32", "float16", "int8")
TOLERANCE = 0.005  # the largest Recall@1 loss
MB = 2 ** 20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_items", type=int, default=1_000_000, help="Gallery items.")
    parser.add_argument("--dim", type=int, default=512, help="Embedding dimension.")
    parser.add_argument("--num_queries", type=int, default=1000, help="Held-out query items.")
    parser.add_argument("--class_size", type=int, default=50, help="Items per class (R of MAP@R).")
    parser.add_argument("--intrinsic_dim", type=int, default=ann_bench_data.INTRINSIC_DIM,
                        help="Directions along which a class varies (its own orthonormal basis in the signal "
                             "subspace); 0: the hard case, isotropic noise in all --dim dimensions.")
    parser.add_argument("--noise", type=float, default=None,
                        help="Norm of each item's within-class noise relative to its class centre's; default "
                             f"{ann_bench_data.SUBSPACE_NOISE:g}, or {ann_bench_data.ISOTROPIC_NOISE:g} at --intrinsic_dim=0.")
    parser.add_argument("--signal_dim", type=int, default=ann_bench_data.SIGNAL_DIM,
                        help="Dimension of the subspace shared by the class centres and bases (--intrinsic_dim > 0).")
    parser.add_argument("--iso_noise", type=float, default=ann_bench_data.ISO_NOISE,
                        help="Norm of each item's isotropic noise, in all --dim dimensions (--intrinsic_dim > 0).")
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
                        help="Candidates re-scored per query; default: the catalogue's (ann.rescore_depth).")
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
        run_worker_task(args.worker, args.worker_output)
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
    if args.intrinsic_dim < 0 or (args.intrinsic_dim and not args.intrinsic_dim <= args.signal_dim <= args.dim):
        parser.error("--intrinsic_dim must be 0 or at most --signal_dim, and --signal_dim at most --dim.")
    if args.noise is None:
        args.noise = ann_bench_data.SUBSPACE_NOISE if args.intrinsic_dim else ann_bench_data.ISOTROPIC_NOISE

    started = time.time()
    load_before = os.getloadavg()
    machine = _machine()
    print(f"Machine: {describe_machine(machine)}; usearch {machine['usearch']}, faiss {machine['faiss']}, "
          f"numpy {machine['numpy']}.", file=sys.stderr, flush=True)
    data = make_data(args)
    shape = data["geometry"]
    print(f"Data: local intrinsic dimension {shape['lid']:.1f}, relative contrast {shape['relative_contrast']:.2f}",
          file=sys.stderr, flush=True)
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
        speedup = cpu_speedup = None
        if exact:  # wall time, and CPU time per query: the steadier when other jobs share the machine
            speedup = row["single"]["queries_per_second"] / exact["single"]["queries_per_second"]
            cpu_speedup = exact["single"]["cpu_ms_per_query"] / row["single"]["cpu_ms_per_query"]
        recall = row["metrics"][f"recall@{k}"]
        delta = row["delta"]["recall@1"]
        targets.append({"target": f"{backend} float32: recall@{k} >= 0.95, Recall@1 at most 0.005 below exact's, "
                                  ">= 10x exact's single-query throughput (in CPU time per query)",
                        f"recall@{k}": recall, "recall@1_delta": delta, "single_speedup": speedup,
                        "single_cpu_speedup": cpu_speedup,
                        "met": bool(recall >= 0.95 and delta >= -TOLERANCE - 1e-9 and cpu_speedup is not None
                                    and cpu_speedup >= 10)})
    for backend in BACKENDS:
        base = by.get((backend, "float32"))
        for dtype in ("float16", "int8"):
            row = by.get((backend, dtype))
            if base and row:
                delta = row["metrics"]["recall@1"] - base["metrics"]["recall@1"]
                targets.append({"target": f"{backend} {dtype}: Recall@1 at most 0.005 below {backend} float32's",
                                "recall@1_delta": delta, "met": bool(delta >= -TOLERANCE - 1e-9)})
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
    exact_single = {row["dtype"]: row["single"]["cpu_ms_per_query"] for row in report["rows"]
                    if row["backend"] == "exact" and "error" not in row}
    ref = report["reference"]
    lines = [f"Data: {_describe_data(data)}; {data['num_queries']:,} held-out queries, k = {k}. Exact float32 "
             f"reference: Recall@1 {ref['recall@1']:.4f}, MAP@R {ref['map@r']:.4f}; Δ = difference to it.", "",
             f"| backend | storage | build s | disk MB (structure) | RSS mmap MB (file-backed) | RSS loaded MB "
             f"| single q/s | CPU ms/query (× exact f32) | batch-{report['settings']['batch_size']} q/s "
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
        ratio = exact_single["float32"] / single["cpu_ms_per_query"] if "float32" in exact_single else None
        lines.append(
            f"| {row['backend']} | {row['dtype']} | {build['seconds']:.1f}{' (reused)' if build.get('reused') else ''} "
            f"| {row['disk_bytes'] / MB:,.0f} ({row['structure_bytes'] / MB:,.0f}) "
            f"| {_mb(mmap, 'peak_rss_bytes')} ({_mb(mmap, 'rss_file_bytes')}) | {_mb(loaded, 'peak_rss_bytes')} "
            f"| {single['queries_per_second']:,.1f} "
            f"| {single['cpu_ms_per_query']:,.2f}{_times(ratio)} "
            f"| {batch['queries_per_second']:,.1f} | {m[f'recall@{k}']:.4f}"
            f"{_same_class(m, k)} "
            f"| {m['recall@1']:.4f} ({d['recall@1']:+.4f}) | {m['map@r']:.4f} ({d['map@r']:+.4f}) |")
    lines += ["", f"ANN settings: {json.dumps(report['settings']['ann'])}; defaults {json.dumps(report['ann_defaults'])}; "
              f"rescore {report['settings']['rescore'] or 'default (HNSW max(10 k, 100), IVF-PQ max(30 k, 300))'}; shards of "
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
                      f"{glyphs['retrieval_metrics_check']['map@r']:.4f}{_describe_geometry(glyphs)}):", "",
                      f"| backend | storage | structure | recall@{k} | Recall@1 (Δ) | MAP@R (Δ) |",
                      "|---|---|---|---|---|---|"]
            for row in glyphs["rows"]:
                m, d = row["metrics"], row["delta"]
                lines.append(f"| {row['backend']} | {row['dtype']} | {row['kind']} | {m[f'recall@{k}']:.4f} "
                             f"| {m['recall@1']:.4f} ({d['recall@1']:+.4f}) | {m['map@r']:.4f} ({d['map@r']:+.4f}) |")
    lines += ["", f"Machine: {describe_machine(report['machine'])}; usearch {report['machine']['usearch']}, "
              f"faiss {report['machine']['faiss']}, numpy {report['machine']['numpy']}."]
    return "\n".join(lines)


def _describe_data(data):
    if data.get("generator", "isotropic") == "isotropic":
        kind = f"isotropic noise {data['noise']:g} (the hard case)"
    else:
        kind = (f"within-class noise {data['noise']:g} along {data['intrinsic_dim']} directions of a shared "
                f"{data['signal_dim']}-d subspace, isotropic noise {data['iso_noise']:g}")
    return (f"{data['num_items']:,} × {data['dim']} synthetic unit embeddings, {data['classes']:,} classes of "
            f"{data['class_size']} (R = {data['r_max']}), {kind}{_describe_geometry(data)}")


def _describe_geometry(section):
    """"; local intrinsic dimension …, relative contrast …" of a data or glyphs section, if measured."""
    shape = section.get("geometry")
    if not shape:
        return ""
    return (f"; local intrinsic dimension {shape['lid']:.1f} (k = {shape['k']}), relative contrast "
            f"{shape['relative_contrast']:.2f}")


def _times(ratio):
    if not ratio:
        return ""
    return f" ({ratio:,.0f}×)" if ratio >= 10 else f" ({ratio:.1f}×)"


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
            "ann": {**build_params(args), **search_params(args)}, "memory": args.memory}


def _choices(parser, text, allowed):
    chosen = [item for item in text.split(",") if item]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        parser.error(f"{text!r}: choose among {', '.join(allowed)}.")
    return chosen


def _command_line(argv):
    relative = os.path.relpath(os.path.abspath(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return " ".join(["python", relative, *(sys.argv[1:] if argv is None else argv)])



if __name__ == "__main__":
    main()
