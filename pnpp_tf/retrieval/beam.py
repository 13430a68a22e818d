"""Embedding a catalogue's images with Apache Beam, then ingesting the embeddings into a catalogue.

    from pnpp_tf.retrieval import beam as beam_lib
    beam_lib.embed_catalogue_pipeline("photos/", "photos.index.beam", "runs/demo")      # DirectRunner
    beam_lib.ingest_embeddings("photos.index.beam", "photos.index")                    # nothing re-embedded

or `python -m pnpp_tf.index --runner=DirectRunner ...` (DataflowRunner, FlinkRunner, SparkRunner
take Beam's own options through --beam_args). Needs the `beam` extra: pip install pnpp_tf[beam].

The pipeline matches the image files under a folder or glob (`fileio.MatchFiles`: local, or any
filesystem Beam reads), keeps pnpp_tf's image extensions, keys each file by (path relative to the
root, size, mtime_ns) as `pnpp_tf.retrieval.cataloguing` does, and embeds them with
`EmbedderModelHandler` under `RunInference`: the same `embed_files(on_bad_image="skip")` the
in-process index uses, so a file is skipped by both or by neither, for the same reason.

Output: one `part-<sha1 of its keys>.npz` per batch of results (`PART_FIELDS`: keys, embeddings of
the files embedded, reasons of those skipped), written under a temporary name and renamed, so a
part is whole or absent; `pipeline.json` (written first: root, model, max_pixels) and, once the
pipeline has finished, `skipped.json`. A killed pipeline, run again, embeds only the files no part
holds yet; `read_output` drops temporary files and keeps one row per file, so the output is
complete and holds no duplicates whatever the runner retried.
"""

import hashlib
import io
import json
import os
import shlex
import shutil
import tempfile
import time

import numpy as np
from absl import logging

from pnpp_tf.data.folder import IMAGE_EXTENSIONS
from pnpp_tf.data.image_header import DEFAULT_MAX_PIXELS
from pnpp_tf.errors import UserError

try:
    import apache_beam as beam
    from apache_beam.io import fileio
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.ml.inference.base import ModelHandler, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError:  # the `beam` extra is not installed: `require_beam` says so when it is needed
    beam = None
    ModelHandler = object

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")
# The DirectRunner's options unless --beam_args gives its own: two worker processes.
DIRECT_DEFAULTS = ("--direct_num_workers=2", "--direct_running_mode=multi_processing")
PIPELINE_FILE = "pipeline.json"
SKIPPED_FILE = "skipped.json"
PART_PREFIX = "part-"
PART_FIELDS = ("paths", "sizes", "mtimes", "embedded", "embeddings", "reasons")
_TEMPORARY_MARK = ".partial-"
# `pnpp_tf.retrieval.embed.CHANGED_DURING_RUN`, without importing TensorFlow where Beam only plans.
_CHANGED_DURING_RUN = "failed while embedding but decodes now: did the file change during the run?"


def require_beam():
    if beam is None:
        raise UserError("Apache Beam is not installed: pip install 'pnpp_tf[beam]' (apache-beam>=2.77,<3).")


class EmbedderModelHandler(ModelHandler):
    """Embeds batches of image files with a pnpp_tf model (`load_embedder`) under RunInference.

    Elements are (path, relative path, size, mtime_ns); each yields one result, in order:
    (relative path, size, mtime_ns, float32 embedding or None, None or the reason it was skipped).

    Args:
        model: a training run's model_dir or an exported SavedModel, as `load_embedder` takes it.
        batch_size: images per model call (`embed_files`' batch_size).
        max_pixels: the pixel budget (--max_pixels).
        files_per_call: files per RunInference batch (`batch_elements_kwargs`), each one `embed_files`
            call; default 16 batches. Each call builds its own input pipeline (about half a second
            here): small ones would spend more time on that than on the images.
    """

    def __init__(self, model, batch_size=64, max_pixels=DEFAULT_MAX_PIXELS, files_per_call=None):
        require_beam()
        super().__init__()
        self._model = model
        self._batch_size = int(batch_size)
        self._max_pixels = int(max_pixels)
        self._files_per_call = int(files_per_call or 16 * self._batch_size)

    def load_model(self):
        from pnpp_tf.artifacts import load_embedder  # in the worker: TensorFlow only where it runs
        return load_embedder(local_model(self._model))

    def run_inference(self, batch, model, inference_args=None):
        batch = list(batch)
        paths = [element[0] for element in batch]
        found = model.embed_files(paths, batch_size=self._batch_size, max_pixels=self._max_pixels,
                                  on_bad_image="skip")
        rows = dict(zip(found.paths, found.embeddings))
        reasons = dict(found.skipped)
        for path, relative, size, mtime in batch:
            row = rows.get(path)
            yield (relative, int(size), int(mtime), row, None if row is not None else reasons.get(path, "not embedded"))

    def batch_elements_kwargs(self):
        return {"min_batch_size": self._files_per_call, "max_batch_size": self._files_per_call}

    def get_num_bytes(self, batch):
        return sum(len(element[0]) for element in batch)

    def get_metrics_namespace(self):
        return "pnpp_tf"


def local_model(model):
    """`model` if local; else (gs://..., any filesystem Beam reads) a local copy, made once per process:
    a model_dir's embedder.keras only, or the whole SavedModel / export directory."""
    if "://" not in model:
        return model
    if model not in _LOCAL_MODELS:
        _LOCAL_MODELS[model] = copy_model(model, tempfile.mkdtemp(prefix="pnpp_tf_model-"))
    return _LOCAL_MODELS[model]


_LOCAL_MODELS = {}


def copy_model(model, directory):
    """Copies the model at `model` (through Beam's filesystems) under `directory`; returns the copy's path."""
    source = model.rstrip("/")
    if source.endswith(".keras"):
        files = [source]
        source = source[:source.rfind("/")]
    else:
        keras_file = FileSystems.join(source, "embedder.keras")
        files = ([keras_file] if FileSystems.exists(keras_file)
                 else [m.path for m in FileSystems.match([FileSystems.join(source, "**")])[0].metadata_list])
    for path in files:
        target = os.path.join(directory, os.path.relpath(path, source) if "://" not in path
                              else path[len(source) + 1:])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with FileSystems.open(path, compression_type="uncompressed") as reader, open(target, "wb") as writer:
            shutil.copyfileobj(reader, writer)
    return os.path.join(directory, os.path.basename(files[0])) if model.rstrip("/").endswith(".keras") else directory


def image_pattern(images):
    """The glob of the image files under `images`: a folder (searched recursively) or a glob itself."""
    if any(char in images for char in "*?["):
        return images
    return images.rstrip("/") + "/**"


def images_root(images):
    """The folder relative paths are taken from: `images`, or the part of a glob before its first wildcard."""
    if not any(char in images for char in "*?["):
        root = images.rstrip("/")
    else:
        head = images[:min(images.index(c) for c in "*?[" if c in images)]
        root = head[:head.rfind("/")] if "/" in head else "."
    return root if "://" in root else os.path.abspath(root)


def _key_of(metadata, root):
    """(path, relative path, size, mtime_ns) of a matched file. A local file is stat'ed again for
    its mtime in nanoseconds (the match gives float seconds, which cannot round-trip to the
    st_mtime_ns `pnpp_tf.retrieval.cataloguing` keys by); a remote one is as matched."""
    path = metadata.path
    relative = path[len(root) + 1:] if path.startswith(root.rstrip("/") + "/") else path
    if "://" not in path:
        try:
            info = os.stat(path)
            return path, relative, info.st_size, info.st_mtime_ns
        except OSError:
            return path, relative, -1, -1
    mtime = metadata.last_updated_in_seconds
    return path, relative, int(metadata.size_in_bytes), int(round(mtime * 1e9)) if mtime is not None else -1


class _WritePart(beam.DoFn if beam else object):
    """Writes a batch of results as one part, named by the sha1 of its keys, under a temporary name
    then renamed: a part is whole or absent, and a retried bundle writes the same part again."""

    def __init__(self, output_dir):
        self._output_dir = output_dir

    def process(self, results):
        results = sorted(results, key=lambda result: result[0])
        paths = np.array([r[0] for r in results], dtype=str)
        embedded = np.array([r[3] is not None for r in results], dtype=bool)
        rows = [r[3] for r in results if r[3] is not None]
        dim = len(rows[0]) if rows else 0
        arrays = {"paths": paths, "sizes": np.array([r[1] for r in results], np.int64),
                  "mtimes": np.array([r[2] for r in results], np.int64), "embedded": embedded,
                  "embeddings": np.asarray(rows, np.float32).reshape(len(rows), dim),
                  "reasons": np.array([r[4] or "" for r in results], dtype=str)}
        digest = hashlib.sha1(json.dumps([list(r[:3]) for r in results]).encode()).hexdigest()
        name = FileSystems.join(self._output_dir, f"{PART_PREFIX}{digest}.npz")
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        _write_atomic(name, buffer.getvalue())
        yield name


def _write_atomic(path, contents):
    temporary = f"{path}{_TEMPORARY_MARK}{os.getpid()}-{os.urandom(4).hex()}"
    with FileSystems.create(temporary) as file:
        file.write(contents)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])


def read_output(output_dir):
    """The pipeline's output: ({key: embedding}, {key: reason}) over every whole part, one entry per
    file (a key: (relative path, size, mtime_ns)). Temporary files, left by a killed write, are not
    read; a file in two parts (a batch retried in another grouping) is counted once."""
    require_beam()
    embedded, skipped = {}, {}
    pattern = FileSystems.join(output_dir, f"{PART_PREFIX}*.npz")
    names = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    for name in names:
        if _TEMPORARY_MARK in os.path.basename(name):
            continue
        with FileSystems.open(name) as file:
            part = np.load(io.BytesIO(file.read()))
            part = {field: part[field] for field in PART_FIELDS}
        rows = iter(part["embeddings"])
        for path, size, mtime, ok, reason in zip(part["paths"], part["sizes"], part["mtimes"], part["embedded"],
                                                  part["reasons"]):
            key = (str(path), int(size), int(mtime))
            if ok:
                row = next(rows)
                if key not in embedded:
                    embedded[key] = row
                skipped.pop(key, None)
            elif key not in embedded:
                skipped.setdefault(key, str(reason))
    return embedded, skipped


def beam_options(runner, pipeline_args=()):
    """`PipelineOptions` for `runner` and Beam's own options (a list, or one shell-quoted string)."""
    require_beam()
    if runner not in RUNNERS:
        raise UserError(f"--runner={runner!r} is not one of {', '.join(RUNNERS)}.")
    args = shlex.split(pipeline_args) if isinstance(pipeline_args, str) else list(pipeline_args)
    if runner == "DirectRunner":
        given = {arg.split("=")[0] for arg in args}
        args = [arg for arg in DIRECT_DEFAULTS if arg.split("=")[0] not in given] + args
    return PipelineOptions([f"--runner={runner}", *args])


def embed_catalogue_pipeline(images, output_dir, model, runner="DirectRunner", pipeline_args=(), batch_size=64,
                             max_pixels=DEFAULT_MAX_PIXELS, resume=True, files_per_call=None):
    """Embeds the images under `images` (a folder or glob) into parts under `output_dir` with Beam.

    Args:
        images: a folder (searched recursively) or a glob, local or on any filesystem Beam reads.
        output_dir: where the parts, pipeline.json and skipped.json go; created if missing.
        model: a model_dir or SavedModel, as `load_embedder` takes it; read by each worker.
        runner: one of `RUNNERS`.
        pipeline_args: Beam's own options, e.g. ["--direct_num_workers=2"] or "--project=p --region=r".
        batch_size, max_pixels: as `ImageEmbedder.embed_files`.
        files_per_call: files per RunInference batch (`EmbedderModelHandler`).
        resume: leave out the files the parts already in `output_dir` hold (a killed run resumed).

    Returns:
        {"embedded": n, "skipped": n, "parts": n} of the whole output; "new": embedded by this run,
        in "seconds" (the pipeline's run, from its start to its end).
    """
    require_beam()
    options = beam_options(runner, pipeline_args)
    images = images if "://" in images else os.path.abspath(images)  # matches are then absolute, as the root
    root = images_root(images)
    FileSystems.mkdirs(output_dir) if not FileSystems.exists(output_dir) else None
    settings = {"images": images, "images_root": root, "model": model, "max_pixels": int(max_pixels)}
    _check_settings(output_dir, settings)
    _write_atomic(FileSystems.join(output_dir, PIPELINE_FILE), json.dumps(settings, indent=1).encode())
    done, embedded = set(), {}
    if resume:
        embedded, skipped = read_output(output_dir)
        done = set(embedded) | {key for key, reason in skipped.items() if reason != _CHANGED_DURING_RUN}
        if done:
            logging.info("Resuming: %d file(s) of %s are embedded or skipped already", len(done), output_dir)
    handler = EmbedderModelHandler(model, batch_size=batch_size, max_pixels=max_pixels, files_per_call=files_per_call)
    start = time.perf_counter()
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | "Match" >> fileio.MatchFiles(image_pattern(images))
             | "Images" >> beam.Filter(lambda m: m.path.lower().endswith(IMAGE_EXTENSIONS))
             | "Key" >> beam.Map(_key_of, root)
             | "NotDone" >> beam.Filter(lambda key, done: tuple(key[1:]) not in done, done)
             | "Reshuffle" >> beam.Reshuffle()
             | "Embed" >> RunInference(handler)
             | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=handler.batch_elements_kwargs()[
                 "max_batch_size"])
             | "Write" >> beam.ParDo(_WritePart(output_dir)))
    seconds, before = time.perf_counter() - start, len(embedded)
    embedded, skipped = read_output(output_dir)
    listing = [[*key, reason] for key, reason in sorted(skipped.items())]
    _write_atomic(FileSystems.join(output_dir, SKIPPED_FILE), json.dumps(listing, indent=1).encode())
    parts = len(FileSystems.match([FileSystems.join(output_dir, f"{PART_PREFIX}*.npz")])[0].metadata_list)
    return {"embedded": len(embedded), "new": len(embedded) - before, "skipped": len(skipped), "seconds": seconds,
            "parts": parts}


def _check_settings(output_dir, settings):
    """Refuses to add to an output of other images, another model or pixel budget."""
    path = FileSystems.join(output_dir, PIPELINE_FILE)
    if not FileSystems.exists(path):
        return
    with FileSystems.open(path) as file:
        before = json.loads(file.read())
    changed = [name for name in ("images_root", "model", "max_pixels") if before.get(name) != settings[name]]
    if changed:
        raise UserError(f"{output_dir} holds embeddings of another {changed[0]} ({before.get(changed[0])}, not "
                        f"{settings[changed[0]]}); choose a new --beam_output.")


def ingest_embeddings(output_dir, index_dir, embedder=None, dtype="float32", backend=None, params=None,
                      shard_size=None, verbose=1):
    """A new catalogue at `index_dir` of the pipeline's output in `output_dir`: nothing is embedded.

    Rows are in the order of their relative paths, as `update_catalogue` adds a new folder's, and
    the skipped files are listed in the manifest as it lists them ([path, size, mtime_ns, reason]),
    so a later `update_catalogue` of the same folder and model embeds only what changed.

    Args:
        embedder: the pipeline's model, loaded (`load_embedder`), for the manifest's record of it;
            None: loaded from pipeline.json's.
        dtype, backend, params, shard_size: as `write_catalogue`.

    Raises:
        UserError: `index_dir` is a catalogue already; no pipeline output or no image embedded.
    """
    require_beam()
    from pnpp_tf.retrieval import cataloguing
    from pnpp_tf.retrieval import catalogue as catalogue_lib
    if catalogue_lib.is_catalogue(index_dir):
        raise UserError(f"--index={index_dir} is a catalogue already; ingesting Beam output needs a new --index.")
    settings_path = FileSystems.join(output_dir, PIPELINE_FILE)
    if not FileSystems.exists(settings_path):
        raise UserError(f"{output_dir} holds no Beam pipeline output ({PIPELINE_FILE} missing).")
    with FileSystems.open(settings_path) as file:
        settings = json.loads(file.read())
    embedded, skipped = read_output(output_dir)
    if not embedded:
        example = next(iter(skipped.items()), None)
        raise UserError(f"None of the images under {settings['images']} were embedded"
                        + (f", e.g. {example[0][0]} ({example[1]})." if example else "."))
    if embedder is None:
        from pnpp_tf.artifacts import load_embedder
        embedder = load_embedder(local_model(settings["model"]))
    identity = cataloguing._model_identity(embedder)
    keys = sorted(embedded)
    embeddings = np.stack([embedded[key] for key in keys]).astype(np.float32)
    # As update_catalogue lists them: a file that decodes now (it changed during the run) is tried again.
    listing = [[*key, reason] for key, reason in sorted(skipped.items()) if reason != _CHANGED_DURING_RUN]
    extra = {"model_kind": identity["model_kind"], "model_stamp": identity["model_stamp"],
             "images_root": settings["images_root"], "max_pixels": settings["max_pixels"], "skipped": listing}
    return cataloguing.write_catalogue(index_dir, embeddings, keys, settings["images_root"],
                                       model=identity["model"], image_size=identity["image_size"], dtype=dtype,
                                       backend=backend, params=params,
                                       shard_size=shard_size or cataloguing.DEFAULT_SHARD_SIZE, verbose=verbose,
                                       extra=extra)
