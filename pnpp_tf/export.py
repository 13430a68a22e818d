"""Exports a trained embedder for TF Serving, phones and ONNX runtimes, and measures that none changes it.

    python -m pnpp_tf.export --model_dir=runs/demo --export_dir=exports/demo

Reads <model_dir>/embedder.keras and results.json (dataset, data_dir, image_size); writes
    <export_dir>/<version>/                      the SavedModel, in TF Serving's layout
    <export_dir>/tflite/<version>/embedder_{float32,float16,dynamic_int8,full_int8}.tflite
    <export_dir>/onnx/<version>/embedder.onnx    with --format=onnx (pnpp_tf.serving.onnx_export)
    <export_dir>/parity/<version>.json and .md   per variant, against the Keras embedder: max abs
                                                 difference, cosine, Recall@1, size, CPU latency
                                                 (see pnpp_tf.serving.parity)
<version> is the next integer after those present, unless --version says otherwise. The layout
of both directories is `pnpp_tf.artifacts`'. --match_threshold (a cosine similarity that
`pnpp_tf.evaluate --calibrate` chose) travels with the version: the SavedModel's variable
`match_threshold`, the ONNX model's metadata, the report's "match_threshold".

A version appears whole or not at all: every part is written under a temporary name, parity is
measured on those files, and only a version that passed (or --publish_on_parity_failure) is
renamed into place, its SavedModel directory last, as TF Serving watches it. A version that fails
leaves only its report, parity/<version>.rejected.json and .md. One export at a time holds
<export_dir>/export.lock, and removes what killed exports left (`ExportDir.remove_leftovers`).
"""

import contextlib
import dataclasses
import os
import sys

import numpy as np
import tensorflow as tf
from absl import logging

from pnpp_tf import flags
from pnpp_tf.serving import onnx_export, parity, retrieve, signatures
from pnpp_tf.artifacts import ExportDir, ModelDir, load_model_dir_embedder
from pnpp_tf.artifacts.export_dir import FORMAT_CHOICES, FORMATS, LOCK_FILE, ONNX_FILE, TFLITE_VARIANTS
from pnpp_tf.config import ExportConfig
from pnpp_tf.data import load_splits, pipeline
from pnpp_tf.data.datasets import verify_images
from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import Staged, check_writable_dir, write_atomic
from pnpp_tf.run_lock import RunLock


def export(model_dir, export_dir, formats=FORMATS, version=None, dataset=None, data_dir=None,
           tflite_variants=TFLITE_VARIANTS, max_pixels=signatures.DEFAULT_MAX_PIXELS,
           representative_images=100, max_eval_images=0, latency_images=50, batch_size=64,
           num_threads=None, publish_on_parity_failure=False, index=None,
           retrieval_max_k=retrieve.DEFAULT_MAX_K, retrieval_dtype="float32", match_threshold=None):
    """Exports the embedder of `model_dir` and writes the parity report beside the export.

    Args:
        model_dir: a training run's directory, holding embedder.keras and results.json.
        export_dir: where to write; the SavedModel goes to `<export_dir>/<version>`, so this is
            TF Serving's `--model_base_path`.
        formats: a subset of `FORMAT_CHOICES` (default `FORMATS`: onnx needs the `onnx` extra).
        version: the integer version to write; None for the next one after those present.
        dataset, data_dir: override the training run's dataset (held-out test images for the
            parity report, training images for full-integer calibration).
        tflite_variants: a subset of `TFLITE_VARIANTS`.
        max_pixels: the largest image (width x height) the bytes signature decodes.
        representative_images: training images calibrating the full-integer int8 model.
        max_eval_images: compare on at most this many test images (0: the whole test split).
        latency_images: single-image calls timed per variant (the median is reported).
        batch_size: images per batch when embedding with Keras and the SavedModel.
        num_threads: CPU threads of the TFLite interpreter and ONNX Runtime (None: all cores).
        publish_on_parity_failure: publish the version even if a variant fails its threshold.
        index: an index written by `python -m pnpp_tf.index` with this model: the SavedModel then
            also answers searches of it, its `retrieve` and `retrieve_embeddings` signatures
            (`pnpp_tf.serving.retrieve`). None: the embedding signatures only.
        retrieval_max_k: the largest k those signatures answer (lowered to the index's size).
        retrieval_dtype: "float32" or "float16" (half the size): how the SavedModel holds the index.
        match_threshold: None, or the cosine similarity in [-1, 1] from which two images are taken
            for the same item (`pnpp_tf.evaluate --calibrate`): saved in the SavedModel (its
            `match_threshold` variable), the ONNX model's metadata_props and the report.

    Returns:
        The report dict. Its "published" says whether the version was published; the report is
        at `<export_dir>/parity/<version>.json` (and `.md`) if so, else at
        `parity/<version>.rejected.json` (and `.md`), and nothing else of the version stays.

    Raises:
        UserError: bad arguments, an --export_dir that cannot be written or is in use by another
            export, or one of `pnpp_tf.artifacts.errors` for embedder.keras or results.json
            (missing, cut short, unloadable, from another run).
        OutOfSpaceError: the disk filled up; nothing of the version is left.
    """
    formats, tflite_variants = _check_choices(formats, tflite_variants)
    for name, value, least in (("representative_images", representative_images, 1),
                               ("max_eval_images", max_eval_images, 0),
                               ("latency_images", latency_images, 1),
                               ("eval_batch_size", batch_size, 1)):
        if int(value) < least:
            raise UserError(f"--{name} must be at least {least}, got {value}.")
    if match_threshold is not None and not -1.0 <= float(match_threshold) <= 1.0:  # NaN too
        raise UserError(f"--match_threshold must be a cosine similarity in [-1, 1], got {match_threshold}.")
    if index and "saved_model" not in formats:
        raise UserError(f"--index={index} is served by the SavedModel: add saved_model to --format.")
    check_writable_dir(export_dir, "--export_dir")
    litert = _import_litert() if "tflite" in formats else None
    onnxruntime = onnx_export.import_onnx()[2] if "onnx" in formats else None
    run = ModelDir(model_dir)
    embedder = load_model_dir_embedder(model_dir)
    if "onnx" in formats:
        onnx_export.check_exportable(embedder.keras_model)
    results = run.read_results()
    if results is not None:
        results.check_image_size(embedder.image_size, run.embedder_path)
    dataset, data_dir = run.dataset(dataset, data_dir)
    splits = load_splits(dataset, data_dir)
    held_out = _held_out(splits, max_eval_images)
    verify_images([p for split in held_out.values() for p in split.paths])
    target = ExportDir(export_dir)
    # Held until the version is published: the leftovers removed below are then surely those of
    # exports that are no longer running, and two exports never pick the same version.
    with RunLock(export_dir, flag="--export_dir", file_name=LOCK_FILE, holder="export"):
        removed = target.remove_leftovers()
        version = target.new_version(version, also_taken=removed)
        module = retrieve.serving_module(embedder.keras_model, max_pixels, index, retrieval_max_k,
                                         retrieval_dtype, image_size=embedder.image_size)
        if match_threshold is not None:
            module.carry_match_threshold(match_threshold)
        variants = [parity.KerasVariant(embedder, run.embedder_path)]
        with _StagedVersion(target, version) as staged:
            if "saved_model" in formats:
                _write_saved_model(module, staged.new_saved_model(retrieve.saved_model_bytes(module)),
                                   variants)
            if "tflite" in formats:
                calibration = None
                if "full_int8" in tflite_variants:
                    calibration = _representative_images(splits["train"], embedder.image_size,
                                                          representative_images)
                _write_tflite(TFLiteExporter(module, calibration), staged.new_tflite(), tflite_variants,
                              litert, num_threads, variants)
            if "onnx" in formats:
                props = onnx_export.metadata(embedder.image_size, embedder.embedding_dim, match_threshold)
                _write_onnx(onnx_export.OnnxExporter(module, props), staged.new_onnx(), onnxruntime,
                            num_threads, variants)
            report = parity.measure_parity(variants, held_out, embedder.image_size, batch_size,
                                           latency_images)
            report.update(
                model_dir=model_dir, export_dir=export_dir, version=version, dataset=dataset,
                data_dir=data_dir, image_size=embedder.image_size, embedding_dim=embedder.embedding_dim,
                max_pixels=int(max_pixels), tflite_threads=num_threads or os.cpu_count(),
                trained_recall_at_1=results.metrics.get("recall@1") if results else None,
                formats=formats, index=index, published=bool(report["passed"] or publish_on_parity_failure),
                match_threshold=None if match_threshold is None else float(match_threshold),
            )
            if report["published"]:
                staged.publish(report)
            else:
                staged.reject(report)
    return report


class _StagedVersion:
    """Version `version` of the `ExportDir` `target`, its parts written under temporary names and
    then published together: the TFLite and ONNX folders, the report, and last the SavedModel directory,
    which TF Serving loads as soon as it appears. Leaving the `with` block removes every part not
    published (after an error, or a rejected version)."""

    def __init__(self, target, version):
        self.target, self.version = target, version
        self._saved_model = self._tflite = self._onnx = None
        self._reports = []

    def new_saved_model(self, needed_bytes):
        self._saved_model = Staged(self.target.version_path(self.version), needed_bytes, directory=True)
        return self._saved_model

    def new_tflite(self):
        self._tflite = Staged(self.target.tflite_dir(self.version), directory=True)
        return self._tflite

    def new_onnx(self):
        self._onnx = Staged(self.target.onnx_dir(self.version), directory=True)
        return self._onnx

    def publish(self, report):
        """Writes the report (naming the files where they will be), then publishes every part."""
        self._name_final_paths(report)
        stem = self.target.parity_stem(self.version)
        texts = {".md": parity.markdown_report(report) + "\n", ".json": parity.report_json(report)}
        for suffix, text in texts.items():
            self._reports.append(Staged(stem + suffix, len(text)))
            with self._reports[-1].writing() as partial, tf.io.gfile.GFile(partial, "w") as file:
                file.write(text)
        for part in self._parts():
            part.publish()
        logging.info("Published version %d in %s", self.version, self.target.path)

    def reject(self, report):
        """Writes the report of a version that failed parity where it cannot be taken for one that passed."""
        self._name_final_paths(report)
        logging.warning("Version %d failed the parity check and is not published.", self.version)
        parity.write_report(report, self.target.rejected_stem(self.version))

    def _parts(self):
        return [part for part in (self._tflite, self._onnx, *self._reports, self._saved_model)
                if part is not None]

    def _name_final_paths(self, report):
        """The variants' paths in `report` as they are once published, not the temporary ones."""
        for row in report["variants"]:
            for part in self._parts():
                if row["path"].startswith(part.temporary):
                    row["path"] = part.path + row["path"][len(part.temporary):]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for part in self._parts():
            part.discard()
        for folder in (self.target.tflite_dir(self.version), self.target.onnx_dir(self.version)):
            with contextlib.suppress(OSError):  # an empty tflite/ or onnx/, unless it holds other versions
                os.rmdir(os.path.dirname(folder))


def _write_saved_model(module, staged, variants):
    """Writes the SavedModel into `staged.temporary` and adds its two variants to `variants`.

    Raises:
        OutOfSpaceError: the disk filled up; nothing of it is left.
    """
    with staged.writing() as folder:
        logging.info("Writing the SavedModel of %s", staged.path)
        module.save(folder)
    loaded = tf.saved_model.load(staged.temporary)
    variants += [parity.SavedModelVariant(loaded, staged.temporary, bytes_input=False),
                 parity.SavedModelVariant(loaded, staged.temporary, bytes_input=True)]


def _write_tflite(converter, staged, tflite_variants, litert, num_threads, variants):
    """Writes each TFLite variant into the folder `staged.temporary` and adds it to `variants`."""
    for variant in tflite_variants:
        logging.info("Converting to TFLite %s", variant)
        flatbuffer = converter.convert(variant)  # outside `writing`: its errors are not a write's
        with staged.writing() as folder:
            path = os.path.join(folder, f"embedder_{variant}.tflite")
            write_atomic(path, flatbuffer)
        variants.append(parity.TFLiteVariant(litert, path, variant, num_threads))


def _write_onnx(converter, staged, onnxruntime, num_threads, variants):
    """Writes the ONNX model into the folder `staged.temporary` and adds it to `variants`."""
    logging.info("Converting to ONNX (opset %d)", onnx_export.OPSET)
    model = converter.convert()  # outside `writing`: its errors are not a write's
    with staged.writing() as folder:
        path = os.path.join(folder, ONNX_FILE)
        write_atomic(path, model)
    variants.append(parity.OnnxVariant(onnxruntime, path, num_threads))


class TFLiteExporter:
    """Converts an embedder (images in [0, 255] -> L2-normalised embedding) to TFLite models.

    Args:
        module: a `pnpp_tf.serving.signatures.EmbedderServingModule`.
        representative_images: float32 [N, S, S, 3] evaluation crops calibrating "full_int8".
    """

    def __init__(self, module, representative_images=None):
        self._module = module
        # Traced once for every variant: a trace of the whole backbone costs seconds, and each
        # converter freezes its own copy of the graph anyway.
        self._function = module.tflite_function()
        self._representative_images = representative_images

    def convert(self, variant):
        """One TFLite flatbuffer (bytes).

        Args:
            variant: "float32"; "float16" (float16 weights); "dynamic_int8" (int8 weights,
                activations quantised on the fly); "full_int8" (int8 weights and activations,
                calibrated on the representative images; the model still takes and returns
                float32).

        Raises:
            UserError: an unknown variant, or "full_int8" without representative images.
        """
        if variant not in TFLITE_VARIANTS:
            raise UserError(f"Unknown TFLite variant {variant!r}; choose from {TFLITE_VARIANTS}.")
        converter = tf.lite.TFLiteConverter.from_concrete_functions([self._function], self._module)
        if variant != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if variant == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if variant == "full_int8":
            images = self._representative_images
            if images is None or not len(images):
                raise UserError("The full_int8 variant needs representative images; got none.")
            converter.representative_dataset = lambda: ([image[None]] for image in images)
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
    for value, choices, flag in ((formats, FORMAT_CHOICES, "--format"),
                                 (tflite_variants, TFLITE_VARIANTS, "--tflite_variants")):
        unknown = [v for v in value if v not in choices]
        if unknown or not value:
            raise UserError(f"{flag}={','.join(value)} is not a non-empty subset of "
                            f"{','.join(choices)}.")
    return formats, tflite_variants


def _import_litert():
    try:
        from ai_edge_litert import interpreter  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise UserError("--format=tflite needs ai-edge-litert to measure the TFLite models: "
                        "pip install 'pnpp_tf[tflite]'.") from error
    return interpreter


def main(config):
    if not config.model_dir or not config.export_dir:
        raise UserError("--model_dir and --export_dir are both required.")
    report = export(
        config.model_dir, config.export_dir, config.format, config.version, config.dataset,
        config.data_dir, config.tflite_variants, config.max_pixels, config.representative_images,
        config.max_eval_images, config.latency_images, config.eval_batch_size, config.tflite_threads,
        config.publish_on_parity_failure, config.index, config.retrieval_max_k, config.retrieval_dtype,
        config.match_threshold,
    )
    print(parity.markdown_report(report))
    failed = [row for row in report["variants"] if row["passed"] is False]
    if failed:
        details = "; ".join(
            f"{row['name']} mean cosine {row['mean_cosine']:.6f} < {row['min_mean_cosine']}"
            for row in failed)
        target = ExportDir(config.export_dir)
        if report["published"]:
            outcome = (f"version {report['version']} was published all the same "
                       "(--publish_on_parity_failure)")
        else:
            outcome = (f"version {report['version']} was not published (report: "
                       f"{target.rejected_stem(report['version'])}.md); pass --publish_on_parity_failure "
                       "to publish it all the same")
        print(f"pnpp_tf.export: error: parity check failed: {details}; {outcome}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    flags.run(main, ExportConfig, "pnpp_tf.export")
