"""Parity of exported embedders with the Keras one: embeddings, Recall@1, size and latency.

Each exported form (SavedModel signatures, TFLite variants, the ONNX model) is wrapped in a variant with an
`embed(images, encoded)` method, embeds the held-out images, and is compared with the first
variant (the Keras embedder), whose `Embedder.embed_files` reads and decodes the files once for all.
"""

import json
import os
import time

import numpy as np
import tensorflow as tf
from absl import logging

from pnpp_tf.retrieval.metrics import retrieval_metrics
from pnpp_tf.retrieval import neighbours
from pnpp_tf.serving import signatures
from pnpp_tf.io_utils import write_atomic

# The least mean cosine similarity to the Keras embedder each variant must reach; None: reported.
MIN_MEAN_COSINE = {
    "saved_model": 0.9999, "saved_model_bytes": 0.9999, "tflite_float32": 0.9999,
    "tflite_float16": 0.999, "tflite_dynamic_int8": 0.98, "tflite_full_int8": None, "onnx": 0.9999,
}


def measure_parity(variants, held_out, image_size, batch_size=64, latency_images=50):
    """Embeds the held-out images with every variant and compares each with the first (Keras).

    The Keras variant embeds the files (`Embedder.embed_files`, its images decoded and cropped by
    the evaluation pipeline; a bad image stops it, named); each of its batches is then given to
    every other variant in turn (a variant taking file bytes gets the files). Each file is read
    and decoded once: memory holds one batch of images and every variant's embeddings (N x D
    floats each, small beside the images).

    Returns:
        A dict with "variants": per variant its name, path, size_bytes, max_abs_diff,
        mean_cosine, min_cosine, recall@1, latency_ms, min_mean_cosine and passed; "passed"
        (every variant with a threshold reaches it), "eval_images" and "latency_images".
    """
    embedded, samples, seconds = _embed_held_out(variants, held_out, image_size, batch_size, latency_images)
    query_part = "test" if "test" in held_out else "query"
    gallery = held_out.get("gallery")
    reference = np.concatenate(list(embedded[0].values()))
    rows = []
    for variant, embeddings in zip(variants, embedded):
        ours = np.concatenate(list(embeddings.values()))
        unit = neighbours.unit_rows(ours)
        cosine = np.sum(unit * reference, axis=1)
        recall = retrieval_metrics(
            embeddings[query_part], held_out[query_part].labels, embeddings.get("gallery"),
            gallery.labels if gallery else None, ks=(1,))["recall@1"]
        threshold = MIN_MEAN_COSINE.get(variant.name)
        rows.append({
            "name": variant.name, "path": variant.path, "size_bytes": variant.size_bytes,
            "max_abs_diff": float(np.max(np.abs(ours - reference))),
            "mean_cosine": float(np.mean(cosine)), "min_cosine": float(np.min(cosine)),
            "recall@1": float(recall), "latency_ms": _median_latency_ms(variant, samples),
            "images_per_second": len(reference) / max(seconds[variant.name], 1e-9),
            "min_mean_cosine": threshold,
            "passed": None if threshold is None else bool(np.mean(cosine) >= threshold),
        })
        logging.info("%s: mean cosine %.6f, Recall@1 %.4f", variant.name, np.mean(cosine), recall)
    return {
        "variants": rows,
        "passed": all(row["passed"] is not False for row in rows),
        "eval_images": {part: len(split) for part, split in held_out.items()},
        "latency_images": len(samples),
    }


def _embed_held_out(variants, held_out, image_size, batch_size, latency_images):
    """([{part: embeddings}] per variant, the first `latency_images` (crop, file bytes) pairs of
    the first part, {variant name: seconds its embedding calls took}), from one pass over the
    files: the Keras variant's `embed_files`, whose every batch the other variants embed too."""
    reference, others = variants[0], variants[1:]
    embedded = [{} for _ in variants]
    samples, seconds = [], {variant.name: 0.0 for variant in variants}
    for part, split in held_out.items():
        batches = [[] for _ in others]

        def embed_batch(paths, images, _, part=part, batches=batches):
            encoded = [_read(path) for path in paths]
            for variant, embeddings in zip(others, batches):
                began = time.perf_counter()
                embeddings.append(variant.embed(images, encoded))
                seconds[variant.name] += time.perf_counter() - began
            if part == next(iter(held_out)) and len(samples) < latency_images:
                samples.extend(list(zip(images, encoded))[:latency_images - len(samples)])

        found = reference.embedder.embed_files(split.paths, batch_size=batch_size, image_size=image_size,
                                               name=f"the held-out {part} images", on_batch=embed_batch)
        embedded[0][part] = found.embeddings
        seconds[reference.name] += found.model_seconds
        for embeddings, parts in zip(batches, embedded[1:]):
            parts[part] = np.concatenate(embeddings)
    return embedded, samples, seconds


def write_report(report, path_stem):
    """Writes `<path_stem>.json` and `<path_stem>.md`."""
    write_atomic(path_stem + ".json", report_json(report))
    write_atomic(path_stem + ".md", markdown_report(report) + "\n")


def report_json(report):
    """The parity report as the text of its .json file."""
    return json.dumps(report, indent=2, sort_keys=True) + "\n"


def markdown_report(report):
    """The parity report as Markdown: a few lines of context, then one table row per variant."""
    images = ", ".join(f"{n} {part}" for part, n in report["eval_images"].items())
    lines = [
        f"# Export parity: {report['model_dir']} -> {report['export_dir']}, version {report['version']}",
        "",
        f"Compared with L2-normalise(Keras embedder) on {images} images of `{report['dataset']}` "
        f"({report['image_size']} px, {report['embedding_dim']}-d). Latency: median of "
        f"{report['latency_images']} single-image calls on CPU (TFLite and ONNX Runtime: "
        f"{report['tflite_threads']} threads; bytes signature: decoding included). Images/s: the "
        "comparison's embedding calls (batches; TFLite one image a call).",
        "",
        "| variant | size | max abs diff | mean cosine | min cosine | Recall@1 | ms/image | images/s | required |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["variants"]:
        required = {None: "reported", True: f"≥ {row['min_mean_cosine']} ok",
                    False: f"≥ {row['min_mean_cosine']} **FAILED**"}[row["passed"]]
        required = "reference" if row["name"] == KerasVariant.name else required
        lines.append(
            f"| {row['name']} | {row['size_bytes'] / 2**20:.2f} MiB | {row['max_abs_diff']:.2e} "
            f"| {row['mean_cosine']:.6f} | {row['min_cosine']:.6f} | {row['recall@1']:.4f} "
            f"| {row['latency_ms']:.2f} | {row['images_per_second']:.1f} | {required} |")
    if report.get("published") is False:
        lines += ["", "**Not published:** a variant failed its parity threshold, so no file of this version was "
                      "kept but this report. Pass --publish_on_parity_failure to publish such a version."]
    elif report.get("published") and not report["passed"]:
        lines += ["", "**Published although a variant failed its parity threshold** "
                      "(--publish_on_parity_failure)."]
    if report.get("match_threshold") is not None:
        lines += ["", f"Match threshold carried by the export (cosine similarity): {report['match_threshold']}."]
    if report.get("trained_recall_at_1") is not None:
        lines += ["", "Recall@1 recorded by training, on the whole test split (results.json): "
                      f"{report['trained_recall_at_1']:.4f}."]
    return "\n".join(lines)


class KerasVariant:
    name = "keras"

    def __init__(self, embedder, path):
        """`embedder`: the Keras embedder's `pnpp_tf.artifacts.Embedder`, which evaluate and index
        embed with (its one trace)."""
        self.path, self.size_bytes = path, os.path.getsize(path)
        self.embedder = embedder

    def embed(self, images, encoded):
        return self.embedder(images)


class SavedModelVariant:
    def __init__(self, loaded, path, bytes_input):
        self.name = "saved_model_bytes" if bytes_input else "saved_model"
        self.path, self.size_bytes = path, _directory_size(path)
        self._bytes_input = bytes_input
        name = signatures.BYTES_SIGNATURE if bytes_input else signatures.IMAGES_SIGNATURE
        self._fn = loaded.signatures[name]

    def embed(self, images, encoded):
        if self._bytes_input:
            return self._fn(**{signatures.BYTES_INPUT: tf.constant(encoded)})[signatures.OUTPUT].numpy()
        return self._fn(**{signatures.IMAGES_INPUT: tf.constant(images)})[signatures.OUTPUT].numpy()


class TFLiteVariant:
    def __init__(self, litert, path, variant, num_threads):
        self.name, self.path, self.size_bytes = f"tflite_{variant}", path, os.path.getsize(path)
        interpreter = litert.Interpreter(model_path=path, num_threads=num_threads or os.cpu_count())
        self._run = interpreter.get_signature_runner()

    def embed(self, images, encoded):
        # One image per call, as on a phone (dynamic-range quantisation depends on the batch).
        return np.stack([self._run(**{signatures.IMAGES_INPUT: image[None]})[signatures.OUTPUT][0]
                         for image in images])


class OnnxVariant:
    """The ONNX model run by ONNX Runtime on the CPU, with `num_threads` threads as TFLite's."""

    name = "onnx"

    def __init__(self, onnxruntime, path, num_threads):
        self.path, self.size_bytes = path, os.path.getsize(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads or os.cpu_count()
        self._session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def embed(self, images, encoded):
        return self._session.run([signatures.OUTPUT], {signatures.IMAGES_INPUT: np.asarray(images, np.float32)})[0]


def _median_latency_ms(variant, samples):
    variant.embed(samples[0][0][None], [samples[0][1]])  # warm-up
    times = []
    for image, encoded in samples:
        start = time.perf_counter()
        variant.embed(image[None], [encoded])
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)


def _read(path):
    with open(path, "rb") as file:
        return file.read()


def _directory_size(path):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)
