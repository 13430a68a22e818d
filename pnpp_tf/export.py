"""Exports a trained embedder for TF Serving and for phones, and measures that neither changes it.

    python -m pnpp_tf.export --model_dir=runs/demo --export_dir=exports/demo

Reads <model_dir>/embedder.keras and results.json (dataset, data_dir, image_size); writes
    <export_dir>/<version>/                      the SavedModel, in TF Serving's layout
    <export_dir>/tflite/<version>/embedder_{float32,float16,dynamic_int8,full_int8}.tflite
    <export_dir>/parity/<version>.json and .md   per variant, against the Keras embedder: max abs
                                                 difference, cosine, Recall@1, size, CPU latency
                                                 (see pnpp_tf.parity)
<version> is the next integer after those present, unless --version says otherwise.
"""

import dataclasses
import os
import sys

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from pnpp_tf import parity, serving
from pnpp_tf.data import DATASETS, load_splits, pipeline
from pnpp_tf.data.datasets import verify_images
from pnpp_tf.indexing.saved_embedder import load_keras_model
from pnpp_tf.io_utils import OutOfSpaceError, read_json_object, replacing_dir, variables_bytes, write_atomic

FORMATS = ("saved_model", "tflite")
TFLITE_VARIANTS = ("float32", "float16", "dynamic_int8", "full_int8")


def export(model_dir, export_dir, formats=FORMATS, version=None, dataset=None, data_dir=None,
           tflite_variants=TFLITE_VARIANTS, max_pixels=serving.DEFAULT_MAX_PIXELS,
           representative_images=100, max_eval_images=0, latency_images=50, batch_size=64,
           num_threads=None):
    """Exports the embedder of `model_dir` and writes the parity report beside the export.

    Args:
        model_dir: a training run's directory, holding embedder.keras and results.json.
        export_dir: where to write; the SavedModel goes to `<export_dir>/<version>`, so this is
            TF Serving's `--model_base_path`.
        formats: a subset of `FORMATS`.
        version: the integer version to write; None for the next one after those present.
        dataset, data_dir: override the training run's dataset (held-out test images for the
            parity report, training images for full-integer calibration).
        tflite_variants: a subset of `TFLITE_VARIANTS`.
        max_pixels: the largest image (width x height) the bytes signature decodes.
        representative_images: training images calibrating the full-integer int8 model.
        max_eval_images: compare on at most this many test images (0: the whole test split).
        latency_images: single-image calls timed per variant (the median is reported).
        batch_size: images per batch when embedding with Keras and the SavedModel.
        num_threads: CPU threads of the TFLite interpreter (None: all cores).

    Returns:
        The report dict, also written to `<export_dir>/parity/<version>.json` (and `.md`).

    Raises:
        ValueError: bad arguments, or an unreadable embedder.keras or results.json.
        OutOfSpaceError: the disk filled up; every file written is whole, the partial one removed.
    """
    formats, tflite_variants = _check_choices(formats, tflite_variants)
    for name, value, least in (("representative_images", representative_images, 1),
                               ("max_eval_images", max_eval_images, 0),
                               ("latency_images", latency_images, 1),
                               ("eval_batch_size", batch_size, 1)):
        if int(value) < least:
            raise ValueError(f"--{name} must be at least {least}, got {value}.")
    litert = _import_litert() if "tflite" in formats else None
    embedder, run = load_trained_embedder(model_dir)
    image_size = int(embedder.input.shape[1])
    dataset = dataset or run.get("dataset")
    data_dir = data_dir or run.get("data_dir")
    if not dataset or not data_dir:
        raise ValueError(f"No dataset known for --model_dir={model_dir} (no results.json with "
                         "flags dataset and data_dir): pass --dataset and --data_dir.")
    if not os.path.isdir(data_dir):
        raise ValueError(f"--data_dir={data_dir} does not exist; pass the dataset's directory "
                         "with --data_dir (results.json paths are relative to where training ran).")
    splits = load_splits(dataset, data_dir)
    held_out = _held_out(splits, max_eval_images)
    verify_images([p for split in held_out.values() for p in split.paths])
    version = resolve_version(export_dir, version)
    module = serving.EmbedderServingModule(embedder, max_pixels=max_pixels)

    variants = [parity.KerasVariant(embedder, os.path.join(model_dir, "embedder.keras"))]
    if "saved_model" in formats:
        path = write_saved_model(module, export_dir, version)
        loaded = tf.saved_model.load(path)
        variants += [parity.SavedModelVariant(loaded, path, bytes_input=False),
                     parity.SavedModelVariant(loaded, path, bytes_input=True)]
    if "tflite" in formats:
        calibration = _representative_images(splits["train"], image_size, representative_images)
        tflite_dir = os.path.join(export_dir, "tflite", str(version))
        for variant in tflite_variants:
            path = os.path.join(tflite_dir, f"embedder_{variant}.tflite")
            logging.info("Converting to TFLite %s", variant)
            write_atomic(path, convert_to_tflite(module, variant, calibration))
            variants.append(parity.TFLiteVariant(litert, path, variant, num_threads))

    report = parity.measure_parity(variants, held_out, image_size, batch_size, latency_images)
    report.update(
        model_dir=model_dir, export_dir=export_dir, version=version, dataset=dataset,
        data_dir=data_dir, image_size=image_size, embedding_dim=int(embedder.output.shape[-1]),
        max_pixels=int(max_pixels), tflite_threads=num_threads or os.cpu_count(),
        trained_recall_at_1=run.get("recall@1"),
    )
    parity.write_report(report, os.path.join(export_dir, "parity", str(version)))
    return report


def load_trained_embedder(model_dir):
    """Loads `<model_dir>/embedder.keras`; returns it and what results.json says of the run.

    Returns:
        (embedder, dict with "dataset", "data_dir", "image_size" and "recall@1" where known).

    Raises:
        ValueError: naming the file, if embedder.keras is missing or unreadable, or results.json
            is unreadable or from another run.
    """
    path = os.path.join(model_dir or "", "embedder.keras")
    if not os.path.isfile(path):
        raise ValueError(f"--model_dir={model_dir} has no embedder.keras; train a model there "
                         "first with python -m pnpp_tf.train.")
    embedder = load_keras_model(path)
    run = {}
    results_path = os.path.join(model_dir, "results.json")
    if os.path.isfile(results_path):
        results = read_json_object(results_path, "results.json of a training run")
        run = {k: v for k, v in _mapping(results, "flags", results_path).items()
               if k in ("dataset", "data_dir", "image_size")}
        run["recall@1"] = _mapping(results, "metrics", results_path).get("recall@1")
    size = embedder.input.shape[1]
    if run.get("image_size") not in (None, size):
        raise ValueError(f"{results_path} says image_size={run['image_size']} but {path} takes "
                         f"{size}-pixel images; is results.json from another run?")
    return embedder, run


def resolve_version(export_dir, version=None):
    """The version to write: `version` if it is free, else the next after those in `export_dir`."""
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ValueError(f"--export_dir={export_dir} is a file, not a directory.")
    taken = set()
    for folder, strip in ((export_dir, ""), (os.path.join(export_dir, "tflite"), ""),
                          (os.path.join(export_dir, "parity"), ".json")):
        if os.path.isdir(folder):
            names = [n[:-len(strip)] if strip and n.endswith(strip) else n
                     for n in os.listdir(folder)]
            taken.update(int(n) for n in names if n.isdigit())
    if version is None:
        return max(taken, default=0) + 1
    if int(version) < 1:
        raise ValueError(f"--version must be a positive integer, got {version}.")
    if int(version) in taken:
        raise ValueError(f"Version {version} already exists in --export_dir={export_dir}; pass "
                         f"another --version, or none to write version {max(taken) + 1}.")
    return int(version)


def write_saved_model(module, export_dir, version):
    """Writes `<export_dir>/<version>` whole or not at all: TF Serving watches the directory and
    would load a half-written version.

    Raises:
        OutOfSpaceError: the disk filled up; no part of the version is left.
    """
    path = os.path.join(export_dir, str(version))
    logging.info("Writing the SavedModel to %s", path)
    with replacing_dir(path, variables_bytes(module.model_variables)) as partial:
        module.save(partial)
    return path


def _mapping(results, key, path):
    """`results[key]`, a JSON object, or {} if absent."""
    value = results.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{path}: its {key!r} is a JSON {type(value).__name__}, not an object; "
                         "is it a training run's results.json?")
    return value


def convert_to_tflite(module, variant, representative_images=None):
    """Converts the embedder (images in [0, 255] -> L2-normalised embedding) to a TFLite model.

    Args:
        module: a `pnpp_tf.serving.EmbedderServingModule`.
        variant: "float32"; "float16" (float16 weights); "dynamic_int8" (int8 weights, activations
            quantised on the fly); "full_int8" (int8 weights and activations, calibrated on
            `representative_images`; the model still takes and returns float32).
        representative_images: float32 [N, S, S, 3] evaluation crops, for "full_int8".

    Returns:
        The TFLite flatbuffer, bytes.
    """
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.tflite_function()], module)
    if variant not in TFLITE_VARIANTS:
        raise ValueError(f"Unknown TFLite variant {variant!r}; choose from {TFLITE_VARIANTS}.")
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if variant == "full_int8":
        if representative_images is None or not len(representative_images):
            raise ValueError("The full_int8 variant needs representative images; got none.")
        converter.representative_dataset = lambda: ([image[None]] for image in representative_images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def _held_out(splits, max_eval_images):
    """The evaluation splits ("test", or "query" and "gallery"), each cut to its first images."""
    n = int(max_eval_images) or None
    return {name: dataclasses.replace(split, paths=split.paths[:n], labels=split.labels[:n])
            for name, split in splits.items() if name in ("test", "query", "gallery")}


def _representative_images(train_split, image_size, count):
    order = np.random.default_rng(0).permutation(len(train_split))[:int(count)]
    paths = [train_split.paths[i] for i in order]
    return np.concatenate(list(pipeline.eval_dataset(paths, image_size).as_numpy_iterator()))


def _check_choices(formats, tflite_variants):
    formats, tflite_variants = list(formats), list(tflite_variants)
    for value, choices, flag in ((formats, FORMATS, "--format"),
                                 (tflite_variants, TFLITE_VARIANTS, "--tflite_variants")):
        unknown = [v for v in value if v not in choices]
        if unknown or not value:
            raise ValueError(f"{flag}={','.join(value)} is not a non-empty subset of "
                             f"{','.join(choices)}.")
    return formats, tflite_variants


def _import_litert():
    try:
        from ai_edge_litert import interpreter  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ValueError("--format=tflite needs ai-edge-litert to measure the TFLite models: "
                         "pip install 'pnpp_tf[tflite]'.") from None
    return interpreter


FLAGS = flags.FLAGS


def define_flags():
    """Defines the command line's flags (only when run as a program: importing defines none)."""
    flags.DEFINE_string("model_dir", None, "Training run directory: embedder.keras, results.json.")
    flags.DEFINE_string("export_dir", None, "Output directory (TF Serving's --model_base_path).")
    flags.DEFINE_list("format", list(FORMATS), "What to export: saved_model, tflite or both.")
    flags.DEFINE_integer("version", None, "Version to write (default: the next after those present).")
    flags.DEFINE_enum("dataset", None, DATASETS, "Override the run's dataset (default: results.json).")
    flags.DEFINE_string("data_dir", None, "Override the run's dataset directory (results.json).")
    flags.DEFINE_list("tflite_variants", list(TFLITE_VARIANTS), "TFLite variants to convert.")
    flags.DEFINE_integer("max_pixels", serving.DEFAULT_MAX_PIXELS,
                         "Largest image (width x height) the bytes signature decodes.")
    flags.DEFINE_integer("representative_images", 100, "Training images calibrating full_int8.")
    flags.DEFINE_integer("max_eval_images", 0, "Compare on at most this many test images (0: all).")
    flags.DEFINE_integer("latency_images", 50, "Single-image calls timed per variant.")
    flags.DEFINE_integer("eval_batch_size", 64, "Images per batch for Keras and the SavedModel.")
    flags.DEFINE_integer("tflite_threads", None, "TFLite interpreter threads (default: all cores).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        if not FLAGS.model_dir or not FLAGS.export_dir:
            raise ValueError("--model_dir and --export_dir are both required.")
        report = export(
            FLAGS.model_dir, FLAGS.export_dir, FLAGS.format, FLAGS.version, FLAGS.dataset,
            FLAGS.data_dir, FLAGS.tflite_variants, FLAGS.max_pixels, FLAGS.representative_images,
            FLAGS.max_eval_images, FLAGS.latency_images, FLAGS.eval_batch_size, FLAGS.tflite_threads,
        )
    except (ValueError, OutOfSpaceError) as error:
        print(f"pnpp_tf.export: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(parity.markdown_report(report))
    failed = [row for row in report["variants"] if row["passed"] is False]
    if failed:
        details = "; ".join(
            f"{row['name']} mean cosine {row['mean_cosine']:.6f} < {row['min_mean_cosine']}"
            for row in failed)
        print(f"pnpp_tf.export: error: parity check failed: {details}.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
