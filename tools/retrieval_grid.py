r"""Pictures of what a trained model retrieves: a grid of queries and neighbours, and a PCA scatter.

    python tools/retrieval_grid.py --model=runs/demo --output=grid.png --scatter=pca.png
    python tools/retrieval_grid.py --model=exports/cub --dataset=cub --data_dir=/data/CUB_200_2011 \
        --queries=8 --k=5 --output=cub_grid.png

--model is a training run's model_dir or an exported SavedModel; the dataset and data_dir default
to those in the run's results.json. Every image of --split (default: test, or query for In-Shop
style datasets) is embedded as evaluation embeds it. The grid shows --queries random queries of
distinct classes, one per row, each followed by its --k nearest images: in the same split with
the query itself left out, or in the gallery when the split is "query" and a gallery exists.
Neighbours are framed green (same class) or red (another class), titled with their cosine
distance and class. --scatter draws a 2-D PCA of the split's embeddings for --scatter_classes
random classes (0: all), one colour per class.
"""

import argparse
import dataclasses
import os
import sys

# Runnable as a plain script from a checkout: make `pnpp_tf` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from pnpp_tf import plots  # noqa: E402
from pnpp_tf.artifacts import ModelDir, load_embedder  # noqa: E402
from pnpp_tf.data import load_splits  # noqa: E402
from pnpp_tf.errors import UserError  # noqa: E402
from pnpp_tf.retrieval.search_index import cosine_distance, cosine_neighbours  # noqa: E402
from pnpp_tf.io_utils import OutOfSpaceError  # noqa: E402


def make_pictures(model, output, scatter=None, dataset=None, data_dir=None, split=None,
                  queries=6, k=5, seed=0, scatter_classes=10, max_images=0, batch_size=64,
                  verbose=1):
    """Draws the grid (and the scatter); returns a dict summarising what was drawn.

    Raises:
        UserError: on a missing or unusable model (`pnpp_tf.artifacts.errors`) or dataset, an
            unknown split, or too few images.
    """
    if queries < 1 or k < 1:
        raise UserError(f"--queries and --k must be at least 1, got {queries} and {k}.")
    dataset, data_dir = ModelDir(model, "--model").dataset(dataset, data_dir)
    splits = load_splits(dataset, data_dir)
    split = split or ("test" if "test" in splits else "query")
    if split not in splits:
        raise UserError(f"--dataset={dataset} has splits {', '.join(sorted(splits))}, "
                         f"not {split!r}.")
    query_split = splits[split]
    gallery_split = splits["gallery"] if split == "query" and "gallery" in splits else None
    rng = np.random.default_rng(seed)
    if max_images:
        keep = _class_subset(query_split.labels, max_images, rng)
        query_split = _restrict(query_split, keep)
        if gallery_split is not None:
            gallery_split = _restrict(gallery_split, keep)

    embedder = load_embedder(model, "--model")
    query_emb, query_paths, query_labels = _embed(embedder, query_split, batch_size, verbose)
    if gallery_split is None:
        gallery_emb, gallery_paths, gallery_labels = query_emb, query_paths, query_labels
    else:
        gallery_emb, gallery_paths, gallery_labels = _embed(embedder, gallery_split, batch_size,
                                                            verbose)
    same_split = gallery_split is None
    if len(gallery_paths) - int(same_split) < k:
        raise UserError(f"--k={k} needs more than {k} images to search; the split has "
                         f"{len(gallery_paths)}.")

    # One query per class, from classes that have a positive to find, in random order.
    gallery_classes, gallery_counts = np.unique(gallery_labels, return_counts=True)
    counts = dict(zip(gallery_classes.tolist(), gallery_counts.tolist()))
    eligible = [label for label in np.unique(query_labels)
                if counts.get(label, 0) > int(same_split)]
    if not eligible:
        eligible = list(np.unique(query_labels))
    classes = rng.permutation(eligible)[:queries]
    chosen = np.array([rng.choice(np.flatnonzero(query_labels == label)) for label in classes])
    exclude = chosen if same_split else None
    similarities, neighbours, _ = cosine_neighbours(query_emb[chosen], gallery_emb, k, exclude,
                                          backend="exact")
    distances = cosine_distance(similarities)
    neighbour_labels = gallery_labels[neighbours]
    where = f"{split}" + (" \u2192 gallery" if not same_split else "")
    title = (f"{dataset} {where}: {len(chosen)} random queries, {k} nearest of "
             f"{len(gallery_paths)} images (green: same class, red: another class)")
    plots.save_retrieval_grid(
        [query_paths[i] for i in chosen], query_labels[chosen],
        [[gallery_paths[j] for j in row] for row in neighbours], neighbour_labels, distances,
        query_split.class_names, output, title=title)
    summary = {"grid": output, "grid_size": plots.grid_size(len(chosen), k + 1),
               "correct": int(np.sum(neighbour_labels == query_labels[chosen][:, None])),
               "shown": int(neighbour_labels.size), "dataset": dataset, "split": split}

    if scatter:
        all_classes = np.unique(query_labels)
        shown = all_classes if not scatter_classes else np.sort(
            rng.permutation(all_classes)[:scatter_classes])
        mask = np.isin(query_labels, shown)
        plots.save_embedding_scatter(
            query_emb[mask], query_labels[mask], query_split.class_names, scatter,
            title=f"PCA of {dataset} {split} embeddings: {len(shown)} of {len(all_classes)} "
                  f"classes, {int(mask.sum())} images")
        summary["scatter"] = scatter
    return summary


def _embed(embedder, split, batch_size, verbose):
    """(embeddings, paths, labels) of the readable images of a split."""
    found = embedder.embed_files(split.paths, batch_size=batch_size, on_bad_image="skip", verbose=verbose)
    if found.skipped:
        print(f"Skipped {len(found.skipped)} unreadable image(s), e.g. {found.skipped[0][0]} "
              f"({found.skipped[0][1]})", file=sys.stderr)
    label_of = dict(zip(split.paths, split.labels))
    return found.embeddings, found.paths, np.array([label_of[p] for p in found.paths], np.int64)


def _class_subset(labels, max_images, rng):
    """Labels of random whole classes holding about `max_images` images in all."""
    classes, sizes = np.unique(labels, return_counts=True)
    order = rng.permutation(len(classes))
    classes, sizes = classes[order], sizes[order]
    count = int(np.searchsorted(np.cumsum(sizes), max_images)) + 1
    return set(classes[:count].tolist())


def _restrict(split, keep):
    mask = np.isin(split.labels, list(keep))
    return dataclasses.replace(split, paths=[p for p, m in zip(split.paths, mask) if m],
                               labels=split.labels[mask])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="A training run's model_dir, or an exported SavedModel.")
    parser.add_argument("--output", required=True, help="The grid PNG to write.")
    parser.add_argument("--scatter", default=None, help="Also write the PCA scatter PNG here.")
    parser.add_argument("--dataset", default=None, help="Default: the run's (results.json).")
    parser.add_argument("--data_dir", default=None, help="Default: the run's (results.json).")
    parser.add_argument("--split", default=None, help="test (default), query, train, ...")
    parser.add_argument("--queries", type=int, default=6, help="Rows: random queries.")
    parser.add_argument("--k", type=int, default=5, help="Neighbours per query.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random choices.")
    parser.add_argument("--scatter_classes", type=int, default=10,
                        help="Random classes in the scatter (0: all).")
    parser.add_argument("--max_images", type=int, default=0,
                        help="Embed only random whole classes of about this many images (0: all).")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per inference batch.")
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    args = parser.parse_args(argv)
    try:
        summary = make_pictures(
            args.model, args.output, args.scatter, args.dataset, args.data_dir, args.split,
            args.queries, args.k, args.seed, args.scatter_classes, args.max_images,
            args.batch_size, verbose=0 if args.quiet else 1)
    except (ValueError, OutOfSpaceError) as error:
        print(f"retrieval_grid.py: error: {error}", file=sys.stderr)
        return 2
    width, height = summary["grid_size"]
    print(f"Wrote {summary['grid']} ({width}x{height} px): {summary['correct']} of the "
          f"{summary['shown']} neighbours shown are of the query's class.")
    if "scatter" in summary:
        print(f"Wrote {summary['scatter']} ({plots.SCATTER_SIZE[0]}x{plots.SCATTER_SIZE[1]} px).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
