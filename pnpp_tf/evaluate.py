"""Measures a trained embedder, or an exported SavedModel, on a dataset's evaluation protocol.

    python -m pnpp_tf.evaluate --model_dir=runs/cub --dataset=cub --data_dir=/data/CUB_200_2011
    python -m pnpp_tf.evaluate --saved_model=exports/cub --dataset=cub --data_dir=... --output_dir=out

Reads <model_dir>/embedder.keras, or with --saved_model a SavedModel whose `serving_default`
signature maps float32 images [N, S, S, 3] in [0, 255] to an output named `embedding` (a
TF Serving base path holding numbered versions means its newest one). The input size comes from
the model; --image_size is the fallback for models that accept any size. Writes
<output_dir or model_dir>/eval_<dataset>.json (the metrics, counts, timings and settings) and
eval_<dataset>.md (the same metrics as a Markdown table).

--calibrate also chooses match thresholds (`pnpp_tf.retrieval.calibration`): the true-accept rate of
pairs at each --false_accept_rates with its cosine threshold, and the threshold of the best F1 of
"the nearest neighbour is a match", under "calibration" in the JSON, in the Markdown, and drawn as
roc_<dataset>.png. A threshold chosen there is what `pnpp_tf.search --threshold` and
`pnpp_tf.export --match_threshold` take.

--eval_distance=euclidean is the authors' protocol: Euclidean distance (and k-means for NMI) on
the raw output of the embedding layer, which only embedder.keras gives (an export's `embedding`
is L2-normalised); cosine, the default, ranks the L2-normalised embeddings.
"""

import json
import os
import time

import numpy as np
from absl import logging

from pnpp_tf import artifacts, flags, plots
from pnpp_tf.retrieval.metrics import nmi, retrieval_metrics
from pnpp_tf.config import EvaluateConfig
from pnpp_tf.data import load_splits, protocol
from pnpp_tf.data.image_check import without_bad
from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import check_writable_dir, write_atomic
from pnpp_tf.retrieval import calibration
from pnpp_tf.retrieval.embed import ImageEmbedder
from pnpp_tf.retrieval.evaluator import check_ks

def evaluate(config):
    """Embeds a dataset's evaluation split with a model and measures retrieval.

    Args:
        config: a `pnpp_tf.config.EvaluateConfig`.

    Returns:
        The dict also written to `<output_dir>/eval_<dataset>.json`.

    Raises:
        UserError: naming the missing or malformed input (model, data, flag, images that do not
            decode with --on_bad_image=error), or an output directory that cannot be written;
            the model's errors are those of `pnpp_tf.artifacts.errors`.
    """
    output_dir = config.output_dir or config.model_dir
    if not output_dir:
        raise UserError("--output_dir (or --model_dir) is required: eval_<dataset>.json is "
                         "written there.")
    # Before any image is embedded: a directory the results cannot be written to is one line now,
    # not a traceback after the whole evaluation.
    if config.output_dir:
        check_writable_dir(output_dir, "--output_dir")
    else:
        check_writable_dir(output_dir, "--model_dir",
                           f"pass --output_dir to write eval_{config.dataset}.json elsewhere")
    eval_protocol = protocol(config.dataset)
    ks = list(config.eval_ks or eval_protocol.ks)
    with_nmi = eval_protocol.nmi if config.nmi == "auto" else config.nmi == "true"
    embedder = load_embedder(config.model_dir, config.saved_model, config.image_size)
    image_size = embedder.image_size
    distance = config.eval_distance
    if distance == "euclidean" and embedder.keras_model is None:
        raise UserError(f"--eval_distance=euclidean needs the raw embedding, but {embedder.source} is an export, "
                        "whose output is L2-normalised; evaluate the run's --model_dir, or use --eval_distance=cosine.")

    start = time.perf_counter()
    query, gallery, skipped, query_embeddings, gallery_embeddings = _checked_splits(config, embedder, ks)
    embed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = retrieval_metrics(
        query_embeddings, query.labels, gallery_embeddings,
        gallery.labels if gallery else None, ks=ks, block_size=config.block_size or None,
        backend=config.backend, distance=distance)
    metrics_seconds = time.perf_counter() - start
    nmi_seconds = None
    if with_nmi:
        start = time.perf_counter()
        both = [query_embeddings] + ([gallery_embeddings] if gallery else [])
        labels = [query.labels] + ([gallery.labels] if gallery else [])
        metrics["nmi"] = nmi(np.concatenate(both), np.concatenate(labels), distance=distance)
        nmi_seconds = time.perf_counter() - start
    calibrated, calibration_seconds = None, None
    if config.calibrate:
        start = time.perf_counter()
        calibrated = calibration.calibrate(
            query_embeddings, query.labels, gallery_embeddings, gallery.labels if gallery else None,
            config.false_accept_rates, config.backend, config.block_size or None, verbose=bool(config.verbose))
        calibration_seconds = time.perf_counter() - start

    num_images = len(query) + (len(gallery) if gallery else 0)
    results = {
        "dataset": config.dataset,
        "data_dir": config.data_dir,
        "model": embedder.source,
        "model_format": embedder.kind,
        "image_size": int(image_size),
        "embedding_dim": int(query_embeddings.shape[1]),
        "ks": ks,
        "backend": config.backend,
        "eval_distance": distance,
        "metrics": metrics,
        "num_query_images": len(query),
        "num_gallery_images": len(gallery) if gallery else None,
        "num_classes": query.num_classes,
        "skipped_images": skipped,
        "timings": {
            "embed_seconds": embed_seconds,
            "images_per_second": num_images / max(embed_seconds, 1e-9),
            "metrics_seconds": metrics_seconds,
            "nmi_seconds": nmi_seconds,
            "calibration_seconds": calibration_seconds,
        },
    }
    if calibrated is not None:
        results["calibration"] = calibrated
        results["roc_png"] = plots.save_roc(
            calibrated, os.path.join(output_dir, f"roc_{config.dataset}.png"),
            title=f"{config.dataset}: {embedder.source}")
    stem = os.path.join(output_dir, f"eval_{config.dataset}")
    write_atomic(stem + ".json", json.dumps(results, indent=2, sort_keys=True) + "\n")
    write_atomic(stem + ".md", markdown_table(results) + _calibration_table(results))
    return results


def _checked_splits(config, embedder, ks):
    """Embeds the evaluation splits, decoding each image once, and applies --on_bad_image.

    The embedding pass (`ImageEmbedder.embed_files`) finds the bad images as a check before
    embedding would have found them (`image_check.drop_or_raise`): the same error and skips,
    without decoding every image twice.

    Args:
        config: a `pnpp_tf.config.EvaluateConfig`.
        embedder: `load_embedder`'s answer.
        ks: the K of Recall@K.

    Returns:
        (query, gallery or None, {split name: skipped paths}, query embeddings, gallery
        embeddings or None): the splits without the skipped images, and the embeddings of the
        images kept, in the same order.

    Raises:
        UserError: an image is bad with --on_bad_image=error, skipping empties a class, or a K
            leaves too few candidates.
    """
    splits = load_splits(config.dataset, config.data_dir)
    names = ["test"] if "test" in splits else ["query", "gallery"]
    # Before anything is decoded, so that a wrong --eval_ks costs no embedding pass.
    check_ks(ks, len(splits[names[0]]), len(splits[names[1]]) if len(names) > 1 else None)
    logging.info("Evaluating %s on %s: %s at %d px", embedder.source, config.dataset,
                 " and ".join(f"{len(splits[name])} {name} images" for name in names), embedder.image_size)
    checked, embedded, skipped = {}, {}, {}
    # Euclidean distance is measured on the raw embedding layer's output, cosine on unit rows.
    images = (ImageEmbedder(embedder.keras_model, embedder.image_size) if config.eval_distance == "euclidean"
              else embedder.image_embedder)
    for name in names:
        found = images.embed_files(splits[name].paths, config.eval_batch_size, config.max_pixels,
                                   on_bad_image=config.on_bad_image, name=name, verbose=config.verbose)
        embedded[name] = found.embeddings
        bad = sorted(path for path, _ in found.skipped)
        checked[name] = without_bad(splits[name], name, set(bad))
        if bad:
            skipped[name] = bad
    query, gallery = checked[names[0]], checked.get("gallery")
    check_ks(ks, len(query), len(gallery) if gallery else None)  # the skipped images are no candidates
    return query, gallery, skipped, embedded[names[0]], embedded.get("gallery")


def load_embedder(model_dir, saved_model=None, image_size=None):
    """Loads the model to evaluate: `saved_model` if given, else `<model_dir>/embedder.keras`.

    Args:
        model_dir: a training run's directory holding embedder.keras.
        saved_model: a SavedModel directory, or a TF Serving base path of numbered versions.
        image_size: the crop size for a model that accepts any (--image_size).

    Returns:
        A `pnpp_tf.artifacts.Embedder`.

    Raises:
        UserError: neither is given, or one of `pnpp_tf.artifacts.errors` for the model.
    """
    if saved_model:
        return artifacts.load_saved_model_embedder(saved_model, "--saved_model", image_size)
    if not model_dir:
        raise UserError("Give --model_dir (holding embedder.keras) or --saved_model.")
    return artifacts.load_model_dir_embedder(
        model_dir, image_size=image_size,
        hint="train there first (python -m pnpp_tf.train) or pass --saved_model")


def markdown_table(results):
    """The metrics of an evaluate() result as a Markdown section (percentages, 2 decimals)."""
    metrics = results["metrics"]
    names = [(f"recall@{k}", f"Recall@{k}") for k in results["ks"]]
    names += [("map@r", "MAP@R"), ("r_precision", "R-Precision"), ("nmi", "NMI")]
    names = [(key, title) for key, title in names if key in metrics]
    gallery = results["num_gallery_images"]
    searched = (f"{results['num_query_images']:,} queries searched in a gallery of {gallery:,}"
                if gallery else f"{results['num_query_images']:,} images, each searched among "
                "all the others")
    lines = [
        f"## {results['dataset']}: `{results['model']}`",
        "",
        f"{searched}, {results['num_classes']:,} classes, {results['image_size']} px, "
        f"{results['embedding_dim']}-d embeddings, {_DISTANCE_WORDS[results.get('eval_distance', 'cosine')]}; "
        "values in %.",
        "",
        "| " + " | ".join(title for _, title in names) + " |",
        "|" + "---|" * len(names),
        "| " + " | ".join(_percent(metrics[key]) for key, _ in names) + " |",
        "",
    ]
    return "\n".join(lines)


def _calibration_table(results):
    """The --calibrate section of eval_<dataset>.md ("" without it)."""
    found = results.get("calibration")
    if not found:
        return ""
    lines = [
        "",
        "### Match thresholds (cosine similarity; accept a pair when it is at least the threshold)",
        "",
        f"{found['same_class_pairs']:,} same-class and {found['other_class_pairs']:,} other-class pairs.",
        "",
        "| false-accept rate | threshold | true-accept rate | measured FAR |",
        "|---|---|---|---|",
    ]
    for row in found["false_accept_rates"]:
        if row["threshold"] is None:
            lines.append(f"| {row['false_accept_rate']:g} | n/a | n/a | n/a |")
            continue
        note = "" if row["resolved"] else " (too few other-class pairs to measure this rate)"
        lines.append(f"| {row['false_accept_rate']:g} | {row['threshold']:.5f} | {_percent(row['true_accept_rate'])}% "
                     f"| {row['measured_false_accept_rate']:.2e}{note} |")
    best = found["best_f1"]
    if best["threshold"] is not None:
        lines += ["", f"The nearest neighbour is a match for {_percent(best['nearest_is_match'])}% of the queries; "
                      f"accepting it when its similarity is at least {best['threshold']:.5f} gives the best F1, "
                      f"{best['f1']:.4f} (precision {best['precision']:.4f}, recall {best['recall']:.4f}; it accepts "
                      f"{best['accepted']:,} of {results['num_query_images']:,} nearest neighbours)."]
    return "\n".join(lines + [""])


_DISTANCE_WORDS = {"cosine": "cosine similarity", "euclidean": "Euclidean distance of the raw embeddings"}


def _percent(value):
    return "n/a" if value is None or np.isnan(value) else f"{100 * value:.2f}"


def main(config):
    results = evaluate(config)
    summary = {"dataset": results["dataset"], "metrics": results["metrics"]}
    if "calibration" in results:
        summary["thresholds"] = {**{f"far@{row['false_accept_rate']:g}": row["threshold"]
                                    for row in results["calibration"]["false_accept_rates"]},
                                 "best_f1": results["calibration"]["best_f1"]["threshold"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    flags.run(main, EvaluateConfig, "pnpp_tf.evaluate")
