"""Embeds every image under a folder with a trained model into a catalogue index, or updates one.

    python -m pnpp_tf.index --model=runs/demo --images=~/Pictures --index=pictures.index
    python -m pnpp_tf.index ... --backend=hnsw --index_dtype=float16     # a million images and more
    python -m pnpp_tf.index ... --runner=DirectRunner    # an Apache Beam pipeline (pnpp_tf[beam]); or
    # --runner=DataflowRunner --beam_args="--project=p --region=r --temp_location=gs://b/tmp" --images=gs://b/photos

--model is a training run's model_dir (embedder.keras) or an exported SavedModel (a version
directory, or the export base directory, whose highest version is used). Images are found
recursively (JPEG, PNG, BMP, GIF, WebP; symbolic links followed, loops of them passed over) and
cropped as evaluation crops them. A file that cannot be read or decoded (a dangling link or a loop
of links too), or whose header gives more than --max_pixels pixels, is skipped, reported and
listed in the index. Run it again on the same folder to embed only new and changed files and drop
deleted ones; a killed run resumes where it stopped (`pnpp_tf.retrieval.cataloguing`). Search it
with python -m pnpp_tf.search.
"""

import os
import time

from pnpp_tf import flags
from pnpp_tf.artifacts import load_embedder
from pnpp_tf.catalogue_config import IndexConfig
from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import check_writable_dir
from pnpp_tf.retrieval.cataloguing import update_catalogue

_SHOWN_SKIPPED = 10
_KINDS = {"keras": "Keras model", "saved_model": "SavedModel"}


def run(config):
    """Builds or updates the catalogue of `config` (an `IndexConfig`); returns the `UpdateReport`.

    Raises:
        UserError: a missing or unreadable input, or an index that cannot be written.
    """
    if not config.model or not config.images or not config.index:
        raise UserError("--model, --images and --index are all required.")
    model, images, index = (os.path.expanduser(p) for p in (config.model, config.images, config.index))
    check_writable_dir(index, "--index")  # before the model is loaded and the images embedded
    if config.runner:
        return _run_beam(config, model, images, index)
    if not os.path.isdir(images):
        raise UserError(f"--images={images} is not a directory.")
    embedder = load_embedder(model)
    try:
        return update_catalogue(embedder, images, index, dtype=config.index_dtype,
                                backend=config.backend, params=config.ann_params(), shard_size=config.shard_size,
                                batch_size=config.batch_size, max_pixels=config.max_pixels,
                                verbose=int(config.progress))
    except OSError as error:
        raise UserError(f"cannot write --index={index}: {error}") from error


def _run_beam(config, model, images, index):
    """Embeds `images` (a folder or glob, on any filesystem Beam reads) with a Beam pipeline on
    --runner into --beam_output (default <index>.beam; a rerun resumes it), then ingests that into
    the new catalogue --index (`pnpp_tf.retrieval.beam`)."""
    from pnpp_tf.retrieval import beam as beam_lib  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval.catalogue import is_catalogue  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval.cataloguing import UpdateReport  # pylint: disable=import-outside-toplevel

    beam_lib.require_beam()
    if is_catalogue(index):
        raise UserError(f"--index={index} is a catalogue already: --runner builds a new one only (update this "
                        "one without --runner, or choose a new --index).")
    output = os.path.expanduser(config.beam_output) if config.beam_output else index.rstrip("/") + ".beam"
    embedder = load_embedder(beam_lib.local_model(model))  # a bad --model fails here, before the pipeline
    summary = beam_lib.embed_catalogue_pipeline(images, output, model, runner=config.runner,
                                                pipeline_args=config.beam_args, batch_size=config.batch_size,
                                                max_pixels=config.max_pixels)
    print(f"Beam {config.runner}: {summary['new']} image(s) embedded in {summary['seconds']:.1f} s "
          f"({summary['new'] / max(summary['seconds'], 1e-9):.1f} images/s, pipeline start-up included) into "
          f"{output}; {summary['embedded']} embedded, {summary['skipped']} skipped in all.")
    try:
        catalogue = beam_lib.ingest_embeddings(
            output, index, embedder=embedder, dtype="float32" if config.index_dtype == "auto" else config.index_dtype,
            backend=None if config.backend == "auto" else config.backend, params=config.ann_params(),
            shard_size=config.shard_size, verbose=int(config.progress))
    except OSError as error:
        raise UserError(f"cannot write --index={index}: {error}") from error
    skipped = [(entry[0], entry[3]) for entry in catalogue.manifest["skipped"]]
    return UpdateReport(catalogue=catalogue, added=summary["new"], kept=len(catalogue) - summary["new"],
                        skipped=skipped, embed_seconds=summary["seconds"])


def main(config):
    start = time.perf_counter()
    report = run(config)
    catalogue = report.catalogue
    meta = catalogue.manifest
    rate = f" ({report.added / report.embed_seconds:.1f} images/s embedded)" if report.added else ""
    print(f"Indexed {len(catalogue)} images under {config.images} into {config.index} in "
          f"{time.perf_counter() - start:.1f} s: {report.added} added{rate}, "
          f"{report.removed} removed, {report.kept} unchanged; {meta['embedding_dim']}-d embeddings of "
          f"{meta['image_size']} px crops stored as {meta['dtype']} in {len(catalogue.shards)} shard(s), "
          f"{(meta.get('approximate') or {}).get('backend', 'exact')} search; "
          f"{_KINDS.get(meta['model_kind'], 'model')} {meta['model']}.")
    skipped = meta["skipped"]
    print(f"Skipped {len(skipped)} unreadable file(s){':' if skipped else '.'}")
    for path, _, _, reason in skipped[:_SHOWN_SKIPPED]:
        print(f"  {os.path.join(meta['images_root'], path)}  ({reason})")
    if len(skipped) > _SHOWN_SKIPPED:
        print(f"  ... and {len(skipped) - _SHOWN_SKIPPED} more, listed in {config.index}/manifest.json.")


if __name__ == "__main__":
    flags.run(main, IndexConfig, "pnpp_tf.index")
