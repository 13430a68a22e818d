"""tools/bench_ann.py's data: the synthetic embeddings, their geometry, the exact ground truth's task
and the metrics of neighbour lists.

Two generators of `num_items` x `dim` unit embeddings with class structure (item i is of class
i mod classes; `class_size` items per class; queries: held-out items of random classes):

  - "subspace" (`intrinsic_dim` m > 0, the default): item = unit(c + noise/sqrt(m) z B_c + iso/sqrt(D) e).
    Everything but the small isotropic part e lies in one shared random `signal_dim`-dimensional
    subspace of the D dimensions: the class centres c (random unit vectors in it) and each class's
    own orthonormal m x D basis B_c (a random m-dimensional subspace of it); z is m-dimensional
    standard normal, so a class varies along m directions only, as trained embeddings vary
    within a class along few (their local intrinsic dimension is low, see `geometry`). The shared
    subspace is what lets classes be confused at all: with every B_c and centre random in all D
    dimensions, another class' items lie orthogonal to a query's offset from its centre and are
    never nearer than its own class' (exact Recall@1 1.000 on 20,000 items, measured).
  - "isotropic" (`intrinsic_dim` 0, "the hard case"): item = unit(c + noise/sqrt(D) e), c a random
    unit vector in all D dimensions: noise in every dimension: at noise 2.5 a local intrinsic
    dimension of 73 (20,000 items) to 92 (100,000), far above trained embeddings'.

Both write the gallery in chunks of CHUNK_ROWS rows to a float32 .npy, with a fixed seed, so
memory stays bounded (the subspace generator keeps only the centres' and bases' coordinates in
the signal subspace, classes x (m + 1) x signal_dim floats).
"""

import json
import os
import shutil
import sys

import numpy as np

# tools/machine.py, beside this file; importing it also puts the repository on the path.
from machine import Stopwatch, write_json

CHUNK_ROWS = 1 << 16          # rows generated at a time
TRUTH_ROWS = 1 << 17          # gallery rows per exact ground-truth block
GEOMETRY_ROWS = 1 << 14       # gallery rows per block of the geometry's distances
DATA_VERSION = 1
GEOMETRY_K = 20               # neighbours of the local intrinsic dimension's estimate
GEOMETRY_SAMPLE = 1000        # items whose neighbourhoods are measured
# The subspace generator's defaults: at 20,000 x 512, local intrinsic dimension 9.6, relative
# contrast 2.28, exact Recall@1 0.972 (measured); at 100,000 x 512 about 11.5, 2.3 and 0.88-0.93
# (extrapolated from 2,500-20,000 items): near trained embeddings' geometry (the glyphs demo model:
# 5.8 and 3.18), and exact Recall@1 high but not trivial. See docs/catalogue_benchmark.md.
INTRINSIC_DIM = 8
SIGNAL_DIM = 32
SUBSPACE_NOISE = 1.5
ISO_NOISE = 0.1
ISOTROPIC_NOISE = 2.5


def data_key(args):
    """The data's folder name under --work_dir/data: the isotropic generator's is the key it had
    before the subspace generator existed (its cached data stay valid); the subspace one adds a suffix."""
    key = f"n{args.num_items}-d{args.dim}-c{args.class_size}-noise{args.noise:g}-q{args.num_queries}-seed{args.seed}"
    if args.intrinsic_dim > 0:
        key += f"-m{args.intrinsic_dim}-s{args.signal_dim}-iso{args.iso_noise:g}"
    return key


def make_data(args):
    """The synthetic gallery (.npy, float32 unit rows), queries and labels under --work_dir, made once,
    and the gallery's geometry (`geometry`), measured once.

    Returns:
        A dict: "gallery" (path), "queries" (path), "query_labels" (int64 [Q]), "classes",
        "r" (int64 [Q], each query's relevant gallery items), "r_max", "geometry", and the settings.
    """
    classes = max(1, args.num_items // args.class_size)
    key = data_key(args)
    folder = os.path.join(args.work_dir, "data", key)
    done = os.path.join(folder, "done.json")
    files = {name: os.path.join(folder, f"{name}.npy") for name in ("gallery", "queries", "query_labels")}
    if not read_json(done).get("version") == DATA_VERSION:
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
    subspace = args.intrinsic_dim > 0
    return {"key": key, "folder": folder, "gallery": files["gallery"], "queries": files["queries"],
            "query_labels": query_labels, "classes": classes, "r": r, "r_max": int(r.max()),
            "num_items": args.num_items, "dim": args.dim, "num_queries": args.num_queries,
            "class_size": args.class_size, "noise": args.noise, "seed": args.seed,
            "generator": "subspace" if subspace else "isotropic", "intrinsic_dim": args.intrinsic_dim,
            "signal_dim": args.signal_dim if subspace else None, "iso_noise": args.iso_noise if subspace else None,
            "gallery_bytes": args.num_items * args.dim * 4, "geometry": data_geometry(folder, files["gallery"])}


def _write_data(args, classes, files):
    items = _subspace_items(args, classes) if args.intrinsic_dim > 0 else _isotropic_items(args, classes)
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


def _isotropic_items(args, classes):
    """items(labels, stream): the hard case's rows (the generator of the tool's first figures, unchanged)."""
    rng = np.random.default_rng([args.seed, 0])
    centres = _unit(rng.standard_normal((classes, args.dim), dtype=np.float32))
    scale = np.float32(args.noise / np.sqrt(args.dim))

    def items(labels, stream):
        noise = np.random.default_rng([args.seed, *stream]).standard_normal((len(labels), args.dim), dtype=np.float32)
        return _unit(centres[labels] + scale * noise)

    return items


def _subspace_items(args, classes):
    """items(labels, stream): rows of the subspace generator (the module's docstring)."""
    m, s, d = args.intrinsic_dim, args.signal_dim, args.dim
    rng = np.random.default_rng([args.seed, 4])
    signal = np.linalg.qr(rng.standard_normal((d, s)))[0].T.astype(np.float32)  # [s, D], orthonormal rows
    centres = _unit(rng.standard_normal((classes, s), dtype=np.float32))  # in the signal subspace's coordinates
    # Each class' basis: m orthonormal vectors of the signal subspace, [classes, m, s] (B_c = bases[c] @ signal).
    bases = np.empty((classes, m, s), np.float32)
    for start in range(0, classes, 4096):
        stop = min(start + 4096, classes)
        bases[start:stop] = np.linalg.qr(rng.standard_normal((stop - start, s, m)))[0].transpose(0, 2, 1)
    within, isotropic = np.float32(args.noise / np.sqrt(m)), np.float32(args.iso_noise / np.sqrt(d))

    def items(labels, stream):
        rows = np.random.default_rng([args.seed, 5, *stream])
        out = np.empty((len(labels), d), np.float32)
        for start in range(0, len(labels), 4096):  # [4096, m, s] at a time
            part = labels[start:start + 4096]
            z = rows.standard_normal((len(part), m), dtype=np.float32)
            coordinates = centres[part] + within * np.einsum("nm,nms->ns", z, bases[part])
            out[start:start + len(part)] = coordinates @ signal + isotropic * rows.standard_normal(
                (len(part), d), dtype=np.float32)
        return _unit(out)

    return items


def _unit(x):
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ------------------------------------------------------------------------------------ geometry

def geometry(x, k=GEOMETRY_K, sample=GEOMETRY_SAMPLE, seed=0):
    """How hard the rows `x` are for approximate search, over the neighbourhoods of `sample` of them
    (drawn with `seed`; all if fewer), each searched among all rows, itself excluded.

    - "lid": the local intrinsic dimension, Levina and Bickel's (2004) maximum likelihood estimate
      from each item's k nearest distances T_1 <= ... <= T_k: ((1 / (k - 1)) sum_j<k log(T_k / T_j))^-1;
      the median over the sample. Trained embeddings: about 5-20; noise in all D dimensions: near D/5.
    - "relative_contrast": mean distance to the other rows / distance to the nearest (He, Kumar
      and Chang 2012); the median. Near 1, every row is about as far as the nearest one.

    Euclidean distances; `x` may be a memory-mapped [N, D] array, read in blocks of GEOMETRY_ROWS.
    Returns {"lid", "relative_contrast", "k", "sample"}.
    """
    n = len(x)
    chosen = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    queries = np.asarray(x[chosen], np.float32)
    query_norms = np.einsum("ij,ij->i", queries, queries)[:, None]
    depth = min(k + 1, n)
    nearest = np.full((len(queries), 0), np.inf, np.float32)
    total = np.zeros(len(queries))
    for start in range(0, n, GEOMETRY_ROWS):
        block = np.asarray(x[start:start + GEOMETRY_ROWS], np.float32)
        squared = query_norms + np.einsum("ij,ij->i", block, block)[None] - np.float32(2) * (queries @ block.T)
        distances = np.sqrt(np.maximum(squared, 0, out=squared), out=squared)
        total += distances.sum(axis=1, dtype=np.float64)
        merged = np.concatenate([nearest, distances], axis=1)
        nearest = np.partition(merged, depth - 1, axis=1)[:, :depth] if merged.shape[1] > depth else merged
    nearest = np.sort(nearest, axis=1).astype(np.float64)
    # Each query's smallest distance is its own (0); the others are its neighbours' (as /tmp/lid.py: the first dropped).
    others = nearest[:, 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        lid = -1.0 / np.mean(np.log(others[:, :-1] / others[:, -1:]), axis=1)
        contrast = (total - nearest[:, 0]) / (n - 1) / others[:, 0]
    return {"lid": float(np.median(lid)), "relative_contrast": float(np.median(contrast)), "k": depth - 1,
            "sample": len(queries)}


def data_geometry(folder, gallery_path):
    """`geometry` of the gallery at `gallery_path`, cached as geometry.json beside it."""
    path = os.path.join(folder, "geometry.json")
    cached = read_json(path)
    if cached.get("k") == GEOMETRY_K and cached.get("requested") == GEOMETRY_SAMPLE:
        return {name: cached[name] for name in ("lid", "relative_contrast", "k", "sample")}
    with Stopwatch() as clock:
        result = geometry(np.load(gallery_path, mmap_mode="r"))
    write_json(path, {**result, "requested": GEOMETRY_SAMPLE, "seconds": clock.seconds})
    print(f"Data geometry: local intrinsic dimension {result['lid']:.1f} (k = {result['k']}), relative contrast "
          f"{result['relative_contrast']:.2f} ({clock.seconds:.1f} s)", file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------------------- truth and metrics

def truth_task(spec):
    """The worker task "truth": the exact top spec["k"] of every query over the gallery, block by block."""
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


def read_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}

