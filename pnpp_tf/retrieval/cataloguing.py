"""Keeping a catalogue index up to date with a folder: only new and changed files are embedded.

    from pnpp_tf.artifacts import load_embedder
    from pnpp_tf.retrieval.cataloguing import update_catalogue

    report = update_catalogue(load_embedder("runs/demo"), "photos/", "photos.index",
                              dtype="float16", backend="hnsw")
    report.added, report.removed, report.skipped     # what this run changed

A file is known by its path under the folder, its size and its mtime, as the image cache keys it.
An update compares the folder with the catalogue: a shard holding files that were deleted or
changed is rewritten without them (from its stored rows: nothing is embedded again), then the new
and changed files are embedded `shard_size` at a time, each batch written as a shard and committed
to the manifest at once. A run killed at any point keeps every committed shard, and the next run
embeds only what is still missing. Files that could not be read are listed in the manifest with
their key, and tried again only once they change.

One update at a time per catalogue (`pnpp_tf.run_lock.RunLock` on `index.lock`); searches need no
lock, since a manifest is replaced in one rename and old shards are removed only after it.
"""

import dataclasses
import os
import re
import shutil
import time

import numpy as np
from absl import logging

from pnpp_tf.data.image_header import DEFAULT_MAX_PIXELS
from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import is_temporary_name, write_json
from pnpp_tf.retrieval import ann, neighbours
from pnpp_tf.retrieval import catalogue as catalogue_lib
from pnpp_tf.retrieval.embed import CHANGED_DURING_RUN, find_images
from pnpp_tf.retrieval.shards import DTYPES, Shard
from pnpp_tf.run_lock import RunLock

DEFAULT_SHARD_SIZE = 65536
LOCK_FILE = "index.lock"
_SHARD_PREFIX = "shard-"
# What an update writes in the catalogue's directory, and may remove: shards, and the temporary
# names of shards and of the manifest (`io_utils.is_temporary_name`).
_WRITTEN = re.compile(rf"{_SHARD_PREFIX}\d{{6,}}(\.partial-.+)?|{re.escape(catalogue_lib.MANIFEST)}\.partial-.+")


@dataclasses.dataclass
class UpdateReport:
    """What `update_catalogue` did.

    Attributes:
        catalogue: the updated `Catalogue`, opened.
        added: files embedded and added by this run (new or changed).
        removed: items removed (deleted or changed files; a changed file is also in `added`).
        kept: items left as they were.
        skipped: [(path, reason)] of the files this run could not embed.
        rewritten: shards rewritten without removed items or with a new structure.
        embed_seconds: time spent reading, decoding and embedding.
    """

    catalogue: object
    added: int = 0
    removed: int = 0
    kept: int = 0
    skipped: list = dataclasses.field(default_factory=list)
    rewritten: int = 0
    embed_seconds: float = 0.0


def update_catalogue(embedder, images_root, directory, dtype="auto", backend="auto", params=None,
                     shard_size=DEFAULT_SHARD_SIZE, batch_size=64, max_pixels=DEFAULT_MAX_PIXELS, verbose=1):
    """Brings the catalogue at `directory` up to date with the images under `images_root`.

    Args:
        embedder: a `pnpp_tf.artifacts.Embedder`: the catalogue's model (checked on an update).
        images_root: the folder of images, searched recursively (`embed.find_images`).
        directory: the catalogue; created if missing.
        dtype: how rows are stored, one of `shards.DTYPES`, which an existing catalogue must
            match; "auto": the existing catalogue's, float32 for a new one.
        backend: None or "exact" for exact search only, or one of `ann.APPROXIMATE`; a change
            (of backend or `params`) rebuilds every shard's structure from its stored rows.
            "auto": as the existing catalogue was built (its parameters too), exact for a new one.
        params: `ann.AnnParams` for `backend`; None: its defaults.
        shard_size: files embedded and committed together; what a kill can lose at most.
        batch_size, max_pixels: as `ImageEmbedder.embed_files`.
        verbose: 1 to show progress.

    Returns:
        An `UpdateReport`.

    Raises:
        UserError: no images, a catalogue of another model, folder or dtype, or bad options.
    """
    if shard_size < 1:
        raise UserError(f"--shard_size must be at least 1, got {shard_size}.")
    root = os.path.abspath(images_root)
    with RunLock(directory, flag="--index", file_name=LOCK_FILE, holder="pnpp_tf.index"):
        built = catalogue_lib.read_manifest(directory) if catalogue_lib.is_catalogue(directory) else {}
        if dtype == "auto":
            dtype = built.get("dtype", "float32")
        if dtype not in DTYPES:
            raise UserError(f"--index_dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
        approximate = built.get("approximate") if backend == "auto" else _approximate(backend, params)
        manifest = _opened_manifest(directory, embedder, root, dtype)
        _remove_unlisted(directory, manifest)
        found = {_relative(path, root): path for path in find_images(root)}
        keys = {relative: _key(relative, path) for relative, path in found.items()}
        report = UpdateReport(catalogue=None)
        wanted = set(keys.values())
        held = _rewrite_shards(directory, manifest, wanted, approximate, report)
        # Unreadable files stay skipped until they change: reading them again would fail again. Under
        # another pixel budget, those it refused may pass: all are tried again.
        if manifest.get("max_pixels") != max_pixels:
            manifest["skipped"], manifest["max_pixels"] = [], max_pixels
        manifest["skipped"] = [entry for entry in manifest["skipped"] if tuple(entry[:3]) in wanted]
        unreadable = {tuple(entry[:3]) for entry in manifest["skipped"]}
        missing = [key for key in sorted(keys.values()) if key not in held and key not in unreadable]
        report.kept = len(held)
        for start in range(0, len(missing), shard_size):
            chunk = missing[start:start + shard_size]
            if verbose:
                logging.info("Embedding %d of the %d new or changed files (%d to %d)", len(chunk),
                             len(missing), start + 1, start + len(chunk))
            _add_shard(directory, manifest, embedder, root, chunk, approximate, batch_size, max_pixels,
                       verbose, report)
        _commit(directory, manifest)
        report.catalogue = catalogue_lib.Catalogue.open(directory)
        if not len(report.catalogue):  # each file is skipped, listed (unreadable) or not (it changed)
            path, reason = ([(entry[0], entry[3]) for entry in manifest["skipped"]] + report.skipped)[0]
            raise UserError(f"None of the {len(keys)} images under --images={images_root} could be read, e.g. "
                            f"{path} ({reason}).")
        return report


def write_catalogue(directory, embeddings, keys, images_root, model="embeddings", image_size=None, dtype="float32",
                    backend=None, params=None, shard_size=DEFAULT_SHARD_SIZE, verbose=1, extra=None):
    """A new catalogue of embeddings made elsewhere (a benchmark's, another pipeline's), shard by shard.

    Args:
        directory: the new catalogue; it must not be one already.
        embeddings: float [N, D] (e.g. a memory-mapped .npy): read `shard_size` rows at a time.
        keys: N (path relative to `images_root`, size, mtime_ns) of the items, in row order.
        images_root: the folder the paths are relative to.
        model, image_size: what the manifest records as the model and its crop size.
        dtype, backend, params, shard_size: as `update_catalogue`.
        verbose: 1 to log each shard.
        extra: manifest entries to record too, e.g. (`pnpp_tf.retrieval.beam.ingest_embeddings`) the
            "skipped" files [[path, size, mtime_ns, reason]], "max_pixels", "model_kind", "model_stamp".

    Returns:
        The `Catalogue`, opened.
    """
    if catalogue_lib.is_catalogue(directory):
        raise UserError(f"--index={directory} is a catalogue already; choose a new directory.")
    if len(keys) != len(embeddings):
        raise UserError(f"{len(embeddings)} embeddings but {len(keys)} keys.")
    approximate = _approximate(backend, params)
    with RunLock(directory, flag="--index", file_name=LOCK_FILE, holder="pnpp_tf.index"):
        identity = {"model": model, "model_kind": "embeddings", "image_size": image_size,
                    "embedding_dim": int(embeddings.shape[1]), "model_stamp": None}
        manifest = _new_manifest(identity, dtype, os.path.abspath(images_root), approximate)
        manifest.update(extra or {})
        for start in range(0, len(keys), shard_size):
            rows = np.asarray(embeddings[start:start + shard_size], np.float32)
            manifest["shards"].append(_write_shard(directory, manifest, rows, list(keys[start:start + shard_size]),
                                                   approximate))
            _commit(directory, manifest)
            if verbose:
                logging.info("Wrote shard %d of %d", start // shard_size + 1, -(-len(keys) // shard_size))
        _commit(directory, manifest)
    return catalogue_lib.Catalogue.open(directory)


def _approximate(backend, params):
    """The manifest's "approximate" entry for `backend`, its parameters checked."""
    if backend in (None, "", "exact"):
        return None
    if backend not in ann.APPROXIMATE:
        raise UserError(f"--backend={backend!r} is not exact or one of {', '.join(ann.APPROXIMATE)}.")
    params = params or ann.AnnParams()
    return {"backend": backend, "params": params.to_json()}


def _opened_manifest(directory, embedder, root, dtype):
    """The catalogue's manifest, checked against this model and folder; a new one if none."""
    identity = _model_identity(embedder)
    if not catalogue_lib.is_catalogue(directory):
        # What a first run killed before its first shard was committed leaves may be there; anything
        # else is not ours, and a catalogue written among it would be mixed with it.
        others = sorted(name for name in (os.listdir(directory) if os.path.isdir(directory) else ())
                        if name != LOCK_FILE and not _WRITTEN.fullmatch(name))
        if others:
            raise UserError(f"--index={directory} is not a catalogue index but holds other files (e.g. "
                            f"{others[0]}); give a new or empty directory.")
        return _new_manifest(identity, dtype, root, None)
    manifest = catalogue_lib.read_manifest(directory)
    dims = (manifest["embedding_dim"], identity["embedding_dim"])
    if (None not in dims and dims[0] != dims[1]) or manifest["image_size"] != identity["image_size"]:
        raise UserError(f"--index={directory} holds {manifest['embedding_dim']}-d embeddings of "
                        f"{manifest['image_size']} px crops, but --model gives {identity['embedding_dim']}-d "
                        f"embeddings of {identity['image_size']} px crops: it was built by another model; "
                        "choose a new --index.")
    if (manifest["model"], manifest["model_stamp"]) != (identity["model"], identity["model_stamp"]):
        raise UserError(f"--index={directory} was built with the model {manifest['model']} as it was on "
                        f"{manifest['created']}; {identity['model']} is another model or has changed since, "
                        "and the two would not be comparable: choose a new --index.")
    if manifest["images_root"] != root:
        raise UserError(f"--index={directory} indexes {manifest['images_root']}, not --images={root}; "
                        "choose a new --index.")
    if manifest["dtype"] != dtype:
        raise UserError(f"--index_dtype={dtype} but --index={directory} stores {manifest['dtype']}; pass "
                        f"--index_dtype={manifest['dtype']}, or choose a new --index.")
    return manifest


def _new_manifest(identity, dtype, images_root, approximate):
    """The manifest of a catalogue with no shard yet: `identity` as `_model_identity` gives it."""
    return {"format": catalogue_lib.FORMAT, "format_version": catalogue_lib.FORMAT_VERSION, **identity,
            "dtype": dtype, "distance": "cosine", "images_root": images_root, "approximate": approximate,
            "shards": [], "next_shard": 0, "skipped": [], "created": _now()}


def _model_identity(embedder):
    """What the manifest records of the model: source, crop size, width and the file's stamp."""
    source = embedder.source
    stamped = os.path.join(source, "saved_model.pb") if os.path.isdir(source) else source
    try:
        info = os.stat(stamped)
        stamp = [info.st_size, info.st_mtime_ns]
    except OSError:
        stamp = None
    return {"model": source, "model_kind": embedder.kind, "image_size": embedder.image_size,
            "embedding_dim": int(embedder.embedding_dim or 0) or None, "model_stamp": stamp}


def _rewrite_shards(directory, manifest, wanted, approximate, report):
    """Rewrites the shards that hold files no longer wanted, or a structure no longer asked for.

    Each shard's entry records the structure it was built with, so that a run killed halfway
    through rebuilding them leaves the rest to the next run rather than without a structure.
    Each shard is opened once, here.

    Returns:
        The set of keys the catalogue's shards hold afterwards (a damaged shard's are not).
    """
    manifest["approximate"] = approximate
    held = set()
    for entry in list(manifest["shards"]):
        try:
            shard = Shard.open(os.path.join(directory, entry["name"]))
        except UserError as error:
            logging.warning("%s; its files are embedded again.", error)
            report.removed += entry["count"]
            _replace_shard(directory, manifest, entry, None)
            continue
        keys = shard.keys()
        rows = [row for row, key in enumerate(keys) if key in wanted]
        held.update(keys[row] for row in rows)  # what the shard keeps, rewritten or not
        if len(rows) == len(keys) and entry.get("approximate") == approximate:
            continue
        report.removed += len(keys) - len(rows)
        report.rewritten += 1
        new_entry = None
        if rows:
            new_entry = _write_shard(directory, manifest, shard.unit_rows(rows), [keys[row] for row in rows],
                                     approximate, already_unit=shard.dtype == manifest["dtype"])
        _replace_shard(directory, manifest, entry, new_entry)
    return held


def _add_shard(directory, manifest, embedder, root, chunk, approximate, batch_size, max_pixels, verbose, report):
    """Embeds the files of `chunk` ([(relative path, size, mtime)]) into a new shard, committed."""
    paths = [os.path.join(root, relative) for relative, _, _ in chunk]
    found = embedder.embed_files(paths, batch_size=batch_size, max_pixels=max_pixels, on_bad_image="skip",
                                 verbose=verbose)
    report.embed_seconds += found.seconds
    by_path = dict(zip(paths, chunk))
    for path, reason in found.skipped:
        if reason != CHANGED_DURING_RUN:  # it decodes now: tried again next time, not listed unreadable
            manifest["skipped"].append([*by_path[path], reason])
        report.skipped.append((path, reason))
    if found.paths:
        keys = [by_path[path] for path in found.paths]
        manifest["shards"].append(_write_shard(directory, manifest, found.embeddings, keys, approximate))
        report.added += len(keys)
    _commit(directory, manifest)


def _trained_structure(directory, manifest, approximate, params):
    """The first ivfpq structure of the catalogue's shards built with `approximate`, read into
    memory, whose trained quantiser a new shard copies (`ann.build(trained=)`); None if there is none."""
    if approximate["backend"] != "ivfpq":
        return None
    for entry in manifest["shards"]:
        if entry.get("approximate") == approximate:
            path = os.path.join(directory, entry["name"], ann.structure_file("ivfpq"))
            try:
                structure = ann.Structure.load("ivfpq", path, mmap=False, params=params)
            except UserError as error:  # a damaged shard: the next one may do
                logging.warning("%s", error)
                continue
            if structure.quantizer_key:
                return structure
    return None


def _write_shard(directory, manifest, rows, keys, approximate, already_unit=False):
    """Writes a new shard of `rows` (float32, as embedded, or with `already_unit` another shard's
    `unit_rows` of the same dtype, kept bit for bit) and returns its manifest entry."""
    name = f"{_SHARD_PREFIX}{manifest['next_shard']:06d}"
    manifest["embedding_dim"] = manifest["embedding_dim"] or int(rows.shape[1])  # a SavedModel may not say
    manifest["next_shard"] += 1
    unit = rows if already_unit else neighbours.unit_rows(rows)  # once, for the structure and the shard
    structure = None
    if approximate:
        params = ann.AnnParams.from_json(approximate["params"])
        structure = ann.build(approximate["backend"], unit, params, manifest["dtype"],
                              trained=_trained_structure(directory, manifest, approximate, params))
    Shard.write(os.path.join(directory, name), unit, keys, manifest["dtype"], structure, already_unit=True)
    return {"name": name, "count": len(keys), "approximate": approximate}


def _replace_shard(directory, manifest, old, new):
    """Puts `new` (or nothing) where `old` was in the manifest, commits, then removes `old`."""
    index = manifest["shards"].index(old)
    manifest["shards"][index:index + 1] = [new] if new else []
    _commit(directory, manifest)
    shutil.rmtree(os.path.join(directory, old["name"]), ignore_errors=True)


def _commit(directory, manifest):
    manifest["updated"] = _now()
    manifest["num_images"] = sum(entry["count"] for entry in manifest["shards"])
    manifest["num_skipped"] = len(manifest["skipped"])
    write_json(os.path.join(directory, catalogue_lib.MANIFEST), manifest)


def _remove_unlisted(directory, manifest):
    """Removes shard directories the manifest does not list: writes a killed run left behind.

    Only names an update writes (`_WRITTEN`): a user's own files, in a directory given as
    --index by mistake, are left alone.
    """
    listed = {entry["name"] for entry in manifest["shards"]}
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if _WRITTEN.fullmatch(name) and (is_temporary_name(name) or name not in listed):
            logging.info("Removing %s, left by an interrupted pnpp_tf.index", os.path.join(directory, name))
            path = os.path.join(directory, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _relative(path, root):
    return os.path.relpath(path, root)


def _key(relative, path):
    """(relative path, size, mtime_ns); a file that cannot be stat'ed (a dangling link) gets -1s,
    and is embedded, failing with its reason."""
    try:
        info = os.stat(path)
        return relative, info.st_size, info.st_mtime_ns
    except OSError:
        return relative, -1, -1


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
