"""Measures a trained embedder, or an exported SavedModel, on a dataset's evaluation protocol.

    python -m pnpp_tf.evaluate --model_dir=runs/cub --dataset=cub --data_dir=/data/CUB_200_2011
    python -m pnpp_tf.evaluate --saved_model=exports/cub --dataset=cub --data_dir=... --output_dir=out

Reads <model_dir>/embedder.keras, or with --saved_model a SavedModel whose `serving_default`
signature maps float32 images [N, S, S, 3] in [0, 255] to an output named `embedding` (a
TF Serving base path holding numbered versions means its newest one). The input size comes from
the model; --image_size is the fallback for models that accept any size. Writes
<output_dir or model_dir>/eval_<dataset>.json (the metrics, counts, timings and settings) and
eval_<dataset>.md (the same metrics as a Markdown table).
"""

import json
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

import pnpp_tf.model  # noqa: F401 - registers the custom layers embedder.keras refers to
from pnpp_tf import evaluation, flags as pnpp_flags
from pnpp_tf.data import load_splits, protocol
from pnpp_tf.data.image_check import drop_or_raise
from pnpp_tf.io_utils import OutOfSpaceError, write_atomic
from pnpp_tf.retrieval import RetrievalEvaluator

FLAGS = flags.FLAGS
# Guarded so this module can share a process with another entry point that defined them.
if "dataset" not in FLAGS:
    pnpp_flags.define_data_flags()
flags.DEFINE_string("saved_model", None, "Evaluate this SavedModel (or TF Serving base path) "
                    "instead of <model_dir>/embedder.keras.")
flags.DEFINE_string("output_dir", None, "Where eval_<dataset>.json and .md go (default: --model_dir).")
flags.DEFINE_enum("backend", "tf", evaluation.BACKENDS, "Exact nearest-neighbour search: tf, or "
                  "faiss (pip install 'pnpp_tf[faiss]'), with the same ranking and tie-break.")
flags.DEFINE_enum("nmi", "auto", ["auto", "true", "false"], "Cluster with k-means and report NMI; "
                  "auto: as the dataset's protocol says (CUB, Cars, folder, glyphs).")
flags.DEFINE_integer("block_size", 0, "Query rows per block of the exact search (0: automatic, "
                     "scores of at most 256 MB per block).")
if "verbose" not in FLAGS:
    flags.DEFINE_integer("verbose", 1, "0: silent; 1: a progress bar while embedding.")

KERAS_FILE = "embedder.keras"
SIGNATURE = "serving_default"
OUTPUT = "embedding"


def evaluate(config):
    """Embeds a dataset's evaluation split with a model and measures retrieval.

    Args:
        config: an object with the attributes of this module's flags (e.g. absl's FLAGS):
            dataset, data_dir, model_dir, saved_model, output_dir, image_size, eval_ks,
            eval_batch_size, on_bad_image, max_pixels, backend, nmi, block_size and verbose.

    Returns:
        The dict also written to `<output_dir>/eval_<dataset>.json`.

    Raises:
        ValueError: naming the missing or malformed input (model, data, flag).
    """
    output_dir = config.output_dir or config.model_dir
    if not output_dir:
        raise ValueError("--output_dir (or --model_dir) is required: eval_<dataset>.json is "
                         "written there.")
    eval_protocol = protocol(config.dataset)
    ks = pnpp_flags.parse_eval_ks(config.eval_ks) or list(eval_protocol.ks)
    with_nmi = eval_protocol.nmi if config.nmi == "auto" else config.nmi == "true"
    if config.block_size < 0:
        raise ValueError(f"--block_size must be >= 0, got {config.block_size}.")
    model, model_path, model_size = load_embedder(config.model_dir, config.saved_model)
    image_size = model_size or config.image_size

    query, gallery, skipped = _checked_splits(config)
    evaluator = RetrievalEvaluator(query, image_size, ks, gallery=gallery,
                                   batch_size=config.eval_batch_size, max_pixels=config.max_pixels)
    logging.info("Evaluating %s on %s: %d query and %d gallery images at %d px", model_path,
                 config.dataset, len(query), len(gallery) if gallery else 0, image_size)

    start = time.perf_counter()
    query_embeddings, gallery_embeddings = evaluator.embed(model, verbose=config.verbose)
    embed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluation.retrieval_metrics(
        query_embeddings, query.labels, gallery_embeddings,
        gallery.labels if gallery else None, ks=ks, block_size=config.block_size or None,
        backend=config.backend)
    metrics_seconds = time.perf_counter() - start
    nmi_seconds = None
    if with_nmi:
        start = time.perf_counter()
        both = [query_embeddings] + ([gallery_embeddings] if gallery else [])
        labels = [query.labels] + ([gallery.labels] if gallery else [])
        metrics["nmi"] = evaluation.nmi(np.concatenate(both), np.concatenate(labels))
        nmi_seconds = time.perf_counter() - start

    num_images = len(query) + (len(gallery) if gallery else 0)
    results = {
        "dataset": config.dataset,
        "data_dir": config.data_dir,
        "model": model_path,
        "model_format": "saved_model" if config.saved_model else "keras",
        "image_size": int(image_size),
        "embedding_dim": int(query_embeddings.shape[1]),
        "ks": ks,
        "backend": config.backend,
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
        },
    }
    stem = os.path.join(output_dir, f"eval_{config.dataset}")
    write_atomic(stem + ".json", json.dumps(results, indent=2, sort_keys=True) + "\n")
    write_atomic(stem + ".md", markdown_table(results))
    return results


def _checked_splits(config):
    """(query, gallery or None, {split name: skipped paths}) after the start-up check of every
    image (`image_check.drop_or_raise`: --on_bad_image, --max_pixels)."""
    splits = load_splits(config.dataset, config.data_dir)
    names = ["test"] if "test" in splits else ["query", "gallery"]
    checked, skipped = {}, {}
    for name in names:
        checked[name], bad = drop_or_raise(splits[name], name, config.on_bad_image,
                                           max_pixels=config.max_pixels)
        if bad:
            skipped[name] = bad
    return checked.get("test", checked.get("query")), checked.get("gallery"), skipped


def load_embedder(model_dir, saved_model=None):
    """Loads the model to evaluate.

    Args:
        model_dir: a training run's directory holding `embedder.keras` (used if `saved_model`
            is None).
        saved_model: a SavedModel directory, or a TF Serving base path of numbered versions.

    Returns:
        `(model, path, image_size)`: a callable mapping an image batch to embeddings (as
        `RetrievalEvaluator.embed` expects), the file or directory it was loaded from, and the
        input side the model requires (None if it accepts any).
    """
    if saved_model:
        path = _resolve_saved_model(saved_model)
        try:
            loaded = tf.saved_model.load(path)
        except (OSError, ValueError) as error:
            raise ValueError(f"--saved_model={path} could not be loaded: "
                             f"{str(error).splitlines()[0]}") from None
        model = _SignatureEmbedder(loaded, path)
        return model, path, model.image_size
    if not model_dir:
        raise ValueError("Give --model_dir (holding embedder.keras) or --saved_model.")
    path = os.path.join(model_dir, KERAS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"--model_dir={model_dir} has no {KERAS_FILE}; train there first "
                         "(python -m pnpp_tf.train) or pass --saved_model.")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # pylint: disable=broad-except - Keras raises many kinds here
        raise ValueError(f"{path} could not be loaded ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    shape = model.input_shape
    return model, path, shape[1] if len(shape) == 4 and shape[1] == shape[2] else None


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
        f"{results['embedding_dim']}-d embeddings; values in %.",
        "",
        "| " + " | ".join(title for _, title in names) + " |",
        "|" + "---|" * len(names),
        "| " + " | ".join(_percent(metrics[key]) for key, _ in names) + " |",
        "",
    ]
    return "\n".join(lines)


class _SignatureEmbedder:
    """A SavedModel's `serving_default` signature, callable on image batches like a Keras model."""

    def __init__(self, loaded, path):
        if SIGNATURE not in loaded.signatures:
            raise ValueError(f"SavedModel {path} has no {SIGNATURE!r} signature (it has "
                             f"{sorted(loaded.signatures) or 'none'}).")
        self._loaded = loaded  # the signature's variables live as long as this reference
        self._function = loaded.signatures[SIGNATURE]
        inputs = self._function.structured_input_signature[1]
        images = [name for name, spec in inputs.items() if spec.shape.rank == 4]
        if len(inputs) != 1 or not images:
            raise ValueError(f"SavedModel {path}: {SIGNATURE} must take one float32 image "
                             f"batch [N, S, S, 3]; it takes {inputs}.")
        self._input = images[0]
        if OUTPUT not in self._function.structured_outputs:
            raise ValueError(f"SavedModel {path}: {SIGNATURE} has no output named {OUTPUT!r} "
                             f"(it has {sorted(self._function.structured_outputs)}).")
        height, width = inputs[self._input].shape[1:3]
        self.image_size = height if height is not None and height == width else None

    def __call__(self, images, training=False):
        """Embeds a batch, called like a Keras model (`training` is ignored)."""
        del training
        return self._function(**{self._input: tf.cast(images, tf.float32)})[OUTPUT]


def _resolve_saved_model(path):
    """A SavedModel directory, or the newest numbered version under a TF Serving base path."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = []
    if os.path.isdir(path):
        versions = sorted((int(name), name) for name in os.listdir(path) if name.isdigit()
                          and os.path.isfile(os.path.join(path, name, "saved_model.pb")))
    if not versions:
        raise ValueError(f"--saved_model={path} is not a SavedModel directory (no saved_model.pb "
                         "in it or in a numbered version folder).")
    chosen = os.path.join(path, versions[-1][1])
    logging.info("Using version %s of %s", versions[-1][1], path)
    return chosen


def _percent(value):
    return "n/a" if value is None or np.isnan(value) else f"{100 * value:.2f}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        results = evaluate(FLAGS)
    except (ValueError, ImportError, OutOfSpaceError) as error:
        print(f"pnpp_tf.evaluate: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"dataset": results["dataset"], "metrics": results["metrics"]}))


if __name__ == "__main__":
    app.run(main)
