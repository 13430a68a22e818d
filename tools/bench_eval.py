"""Benchmarks exact retrieval evaluation at Stanford Online Products and In-Shop scale.

    python tools/bench_eval.py                    # SOP x 512, SOP x 2048, In-Shop x 512
    python tools/bench_eval.py --configs=sop512   # one configuration
    python tools/bench_eval.py --quick            # tiny sizes, a few seconds per row
    python tools/bench_eval.py --configs=sop512 --backends=calibrate   # match thresholds

Each (configuration, backend) runs in a fresh subprocess, which makes synthetic embeddings with
class structure (a random centre per class plus noise, so the metrics are neither 0 nor 1),
evaluates them with `pnpp_tf.retrieval.metrics.retrieval_metrics` and reports:
  - seconds: wall time of the evaluation, XLA compilation included;
  - peak RSS: the process' peak resident memory minus its resident memory once the embeddings
    exist, i.e. everything the evaluation added;
  - the matmul floor: the evaluation's multiply-adds (2 x queries x gallery x dim flops) divided
    by the float32 matmul speed measured in the same process right after (best of several
    square multiplies), i.e. the time the similarity matrix alone takes on this machine; and
    the same ratio in CPU seconds, which holds up better when other work shares the machine.
The faiss rows give the largest difference of any of their metrics to the TensorFlow row's
(0: identical). The "calibrate" rows time `pnpp_tf.retrieval.calibration.calibrate` (pnpp_tf.evaluate
--calibrate: every pair counted into histograms, and each query's nearest neighbour) on the same
embeddings; their R@1 is the share of queries whose nearest neighbour matches, and they add the
true-accept rate at a false-accept rate of 0.001.
"""

import argparse
import collections
import json
import os
import resource
import subprocess
import sys

# tools/machine.py, beside this script; importing it also puts the repository on the path.
from machine import Stopwatch, describe_machine, machine_info, write_json

Config = collections.namedtuple("Config", "name queries gallery dim classes ks noise")
# Noise per dimension grows with the dimension so that Recall@1 stays near the paper's values.
CONFIGS = {
    "sop512": Config("SOP", 60502, 0, 512, 11316, (1, 10, 100, 1000), 2.2),
    "sop2048": Config("SOP", 60502, 0, 2048, 11316, (1, 10, 100, 1000), 3.2),
    "inshop512": Config("In-Shop", 14218, 12612, 512, 3985, (1, 10, 20, 30, 40, 50), 2.1),
    "inshop2048": Config("In-Shop", 14218, 12612, 2048, 3985, (1, 10, 20, 30, 40, 50), 3.1),
}
DEFAULT_CONFIGS = ("sop512", "sop2048", "inshop512")
QUICK_CONFIGS = {
    "sop_quick": Config("SOP-like", 3000, 0, 64, 560, (1, 10, 100, 1000), 1.0),
    "inshop_quick": Config("In-Shop-like", 700, 620, 64, 200, (1, 10, 20, 30, 40, 50), 1.0),
}
BACKENDS = ("tf", "faiss", "calibrate")
DEFAULT_BACKENDS = ("tf", "faiss")
MAX_CLASS_SIZE = 12  # SOP's largest test class has 12 images
SEED = 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes, for a smoke test.")
    parser.add_argument("--configs", default="", help="Comma-separated configurations of "
                        f"{', '.join(CONFIGS)} (default: {', '.join(DEFAULT_CONFIGS)}), or with "
                        f"--quick of {', '.join(QUICK_CONFIGS)}.")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help="Comma-separated backends to run (tf, faiss, calibrate).")
    parser.add_argument("--json", default="", help="Also write the rows to this JSON file.")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    if args.worker:
        name, backend = args.worker.split(":")
        print(json.dumps(_measure({**CONFIGS, **QUICK_CONFIGS}[name], backend)))
        return
    names = args.configs.split(",") if args.configs else list(
        QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    backends = args.backends.split(",")
    unknown = sorted(set(names) - set(configs)) + sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown configurations or backends {unknown}; configurations: "
                     f"{', '.join(configs)}; backends: {', '.join(BACKENDS)}.")

    load = os.getloadavg()
    rows = []
    for name in names:
        for backend in backends:
            print(f"running {name} with {backend} ...", file=sys.stderr, flush=True)
            row = {"config": name, "backend": backend, **_run_worker(name, backend)}
            rows.append(row)
    _compare_to_tf(rows)
    print(format_table(rows, configs))
    print(f"\nload average (1 min) before: {load[0]:.1f}, after: {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs\nMachine: {describe_machine(machine_info())}.")
    if args.json:
        # A list of the rows, as scripts that read this file expect (no machine or command).
        write_json(args.json, rows)


def format_table(rows, configs):
    """The rows as one Markdown table."""
    lines = [
        "| data | queries × gallery × dim | backend | seconds | matmul floor (s) | × floor "
        "| × floor, CPU time | peak RSS above embeddings | embeddings | R@1 | MAP@R "
        "| largest metric difference to tf | TAR at FAR 0.001 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        config = configs[row["config"]]
        gallery = f"{config.gallery:,}" if config.gallery else "(same)"
        shape = f"{config.queries:,} × {gallery} × {config.dim}"
        if "error" in row:
            lines.append(f"| {config.name} | {shape} | {row['backend']} | {row['error']} "
                         "| | | | | | | | | |")
            continue
        floor = row["flops"] / (row["matmul_gflops"] * 1e9)
        cpu_floor = row["flops"] / (row["matmul_cpu_gflops"] * 1e9)
        delta = row.get("max_delta")
        same = "" if delta is None else "0" if delta == 0 else f"{delta:.1e}"
        tar = row.get("tar_at_far_0.001")
        map_r = row["metrics"].get("map@r")
        lines.append(
            f"| {config.name} | {shape} | {row['backend']} | {_seconds(row['seconds'])} | {_seconds(floor)} "
            f"({row['matmul_gflops']:.0f} GFLOP/s) | {row['seconds'] / floor:.2f} "
            f"| {row['cpu_seconds'] / cpu_floor:.2f} "
            f"| {_megabytes(row['peak_rss_bytes'])} | {_megabytes(row['embedding_bytes'])} "
            f"| {row['metrics']['recall@1']:.4f} | {'–' if map_r is None else f'{map_r:.4f}'} | {same} "
            f"| {'' if tar is None else f'{tar:.4f}'} |")
    return "\n".join(lines)


def make_embeddings(config, seed=SEED):
    """Synthetic embeddings with class structure, written in chunks (no full-size temporary).

    Returns:
        `(queries, query_labels, gallery, gallery_labels)`; the gallery pair is None without one.
    """
    import numpy as np  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((config.classes, config.dim), dtype=np.float32)

    def draw(count, minimum):
        sizes = _class_sizes(rng, count, config.classes, minimum)
        labels = rng.permutation(np.repeat(np.arange(config.classes), sizes))
        x = np.empty((count, config.dim), np.float32)
        for start in range(0, count, 4096):
            part = labels[start:start + 4096]
            x[start:start + len(part)] = centres[part] + config.noise * rng.standard_normal(
                (len(part), config.dim), dtype=np.float32)
        return x, labels

    # SOP: every class has at least 2 images, so every query has a positive.
    queries, query_labels = draw(config.queries, 1 if config.gallery else 2)
    if not config.gallery:
        return queries, query_labels, None, None
    gallery, gallery_labels = draw(config.gallery, 1)
    return queries, query_labels, gallery, gallery_labels


def _class_sizes(rng, total, classes, minimum):
    """Random class sizes between `minimum` and MAX_CLASS_SIZE summing to `total`."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    sizes = np.full(classes, minimum)
    left = total - sizes.sum()
    while left > 0:
        np.add.at(sizes, rng.integers(0, classes, size=left), 1)
        excess = np.maximum(sizes - MAX_CLASS_SIZE, 0)
        sizes -= excess
        left = int(excess.sum())
    return sizes


def _measure(config, backend):
    """In the worker: evaluate once, then measure this process' matmul speed."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from pnpp_tf.retrieval.calibration import calibrate  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval.metrics import retrieval_metrics  # pylint: disable=import-outside-toplevel

    if backend == "faiss":
        try:
            import faiss  # noqa: F401 pylint: disable=import-outside-toplevel,unused-import
        except ImportError:
            return {"error": "faiss not installed"}
    queries, query_labels, gallery, gallery_labels = make_embeddings(config)
    embedding_bytes = queries.nbytes + (gallery.nbytes if gallery is not None else 0)
    baseline = _current_rss_bytes()
    extra = {}
    with Stopwatch() as clock:
        if backend == "calibrate":
            found = calibrate(queries, query_labels, gallery, gallery_labels, false_accept_rates=(1e-3,))
            metrics = {"recall@1": found["best_f1"]["nearest_is_match"]}
            extra["tar_at_far_0.001"] = found["false_accept_rates"][0]["true_accept_rate"]
        else:
            metrics = retrieval_metrics(queries, query_labels, gallery, gallery_labels,
                                        ks=config.ks, backend=backend)
    peak = _peak_rss_bytes()
    num_gallery = config.gallery or config.queries
    gflops, cpu_gflops = _matmul_gflops(tf, np, 1024 if config.queries < 10000 else 4096)
    return {
        "seconds": clock.seconds,
        "cpu_seconds": clock.cpu_seconds,
        "peak_rss_bytes": peak - baseline,
        "embedding_bytes": embedding_bytes,
        "flops": 2.0 * config.queries * num_gallery * config.dim,
        "matmul_gflops": gflops,
        "matmul_cpu_gflops": cpu_gflops,
        "metrics": metrics,
        **extra,
    }


def _matmul_gflops(tf, np, size, repeats=5):
    """Best float32 GFLOP/s of a size x size TensorFlow matmul, per wall and per CPU second.

    CPU time is what the process got of the cores, so its ratio still means something when
    other work shares the machine and stretches the wall time of both measurements unequally.
    """
    rng = np.random.default_rng(1)
    a = tf.constant(rng.standard_normal((size, size), dtype=np.float32))
    b = tf.constant(rng.standard_normal((size, size), dtype=np.float32))
    tf.matmul(a, b)[0, 0].numpy()  # warm-up
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        with Stopwatch() as clock:
            tf.matmul(a, b)[0, 0].numpy()
        best = min(best, clock.seconds)
        best_cpu = min(best_cpu, clock.cpu_seconds)
    return 2.0 * size ** 3 / best / 1e9, 2.0 * size ** 3 / best_cpu / 1e9


def _current_rss_bytes():
    try:
        with open("/proc/self/statm", encoding="ascii") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far is the best available baseline
        return _peak_rss_bytes()


def _peak_rss_bytes():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB


def _run_worker(name, backend):
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--worker={name}:{backend}"],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"failed: {tail[0]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _compare_to_tf(rows):
    """Gives each non-tf row the largest absolute difference of its metrics to the tf row's."""
    reference = {row["config"]: row["metrics"] for row in rows
                 if row["backend"] == "tf" and "metrics" in row}
    for row in rows:
        if row["backend"] == "faiss" and "metrics" in row and row["config"] in reference:
            row["max_delta"] = max(abs(value - reference[row["config"]][name])
                                   for name, value in row["metrics"].items())


def _seconds(value):
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _megabytes(count):
    return f"{count / 2 ** 20:,.0f} MB"


if __name__ == "__main__":
    main()
