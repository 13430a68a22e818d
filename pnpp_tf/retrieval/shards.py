"""One shard of a catalogue index: a directory of plain files, written whole and then read mapped.

    shard = Shard.write(directory, embeddings, items, dtype="float16")   # whole or not at all
    shard = Shard.open(directory)          # memory-mapped: nothing is read until it is used
    shard.unit_rows(np.array([3, 7]))      # float32 unit rows, decoded from the stored dtype
    shard.relative_path(3), shard.keys()   # the item's path under the root, (path, size, mtime_ns)

A shard holds, for its n items (`SHARD_FILES`):

    embeddings.npy    [n, D] float32, float16 or int8 (`DTYPES`)
    scales.npy        [n] float32, int8 only: row i is embeddings[i] * scales[i]
    paths.bin         the items' paths relative to the catalogue's root, UTF-8, back to back
    path_offsets.npy  [n + 1] int64: path i is paths.bin[offsets[i]:offsets[i + 1]]
    sizes.npy, mtimes.npy   [n] int64: each file's size and mtime (ns) when it was embedded
    shard.json        n, D, dtype and the format version
    <structure>       optionally, an approximate backend's file (`pnpp_tf.retrieval.ann`)

Every array is an .npy file, so a shard is searched through `np.load(mmap_mode="r")`: a process
holds only the pages it touches, and a catalogue larger than memory can still be searched. Paths
are one byte string with offsets rather than a fixed-width string array, whose width would be the
longest path's for every item (hundreds of bytes per item at a million items).

Rows are scaled to unit length (`neighbours.unit_rows`, as the exact engine prepares any gallery)
and then stored so that they decode to unit length again: float32 and float16 rows are the unit
row rounded; int8 rows are codes (each row scaled by its own largest magnitude to +-127, so every
row keeps 8 bits of precision) and a per-row scale of 1 / ||codes||. Every row is scored as it
decodes, with no second normalisation: an exact search multiplies a float32 shard's mapped file
itself, and a float16/int8 block costs one conversion. (Shards written before this, whose
shard.json lacks "unit_rows", are scaled to unit length when read, as they were then.)
"""

import json
import os

import numpy as np

from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import replacing_dir
from pnpp_tf.retrieval import ann, neighbours

SHARD_FORMAT_VERSION = 1
DTYPES = ann.DTYPES
SHARD_FILES = ("embeddings.npy", "paths.bin", "path_offsets.npy", "sizes.npy", "mtimes.npy", "shard.json")
_INT8_MAX = 127.0
# Rows decoded at a time, so that decoding a whole shard never holds two float32 copies.
_DECODE_ROWS = 1 << 14


class Shard:
    """A shard directory, opened memory-mapped (see the module).

    Use `Shard.open` or `Shard.write`; the constructor takes the opened parts.
    """

    def __init__(self, directory, embeddings, scales, paths_blob, path_offsets, sizes, mtimes,
                 stored_unit=False):
        self.directory = directory
        # Rows stored to decode to unit length are scored as decoded (see the module).
        self._stored_unit = bool(stored_unit)
        self.embeddings = embeddings
        self.scales = scales
        # Plain arrays over the same mapped pages: np.memmap's Python-level indexing costs a
        # tenth of a millisecond per call, which a search makes for every shard and query block.
        self._stored = embeddings.view(np.ndarray)
        self._scales = None if scales is None else scales.view(np.ndarray)
        self._paths_blob = paths_blob
        self._path_offsets = path_offsets
        self.sizes = sizes
        self.mtimes = mtimes

    @classmethod
    def write(cls, directory, embeddings, items, dtype, structure=None, already_unit=False):
        """Writes a shard to `directory` (which must not exist) whole or not at all, and opens it.

        Args:
            directory: the shard's directory; created through a temporary sibling and renamed,
                so a kill leaves either no shard or a complete one.
            embeddings: float32 [n, D], n >= 1, finite; stored scaled to unit length.
            items: n (relative path, size, mtime_ns) of the files the rows embed.
            dtype: one of `DTYPES`, how the rows are stored.
            structure: optional `pnpp_tf.retrieval.ann.Structure` built over these rows; saved
                under its backend's file name.
            already_unit: the rows are unit rows already (scaled by the caller, or another shard's
                `unit_rows` of the same dtype): stored as they are, so that a rewritten shard
                scores its rows exactly as before.

        Raises:
            UserError: a bad dtype, or rows and items of different lengths.
            OutOfSpaceError: the disk filled up (nothing is left behind).
        """
        name = f"embeddings of shard {directory}"
        embeddings = neighbours.check_rows(embeddings, name) if already_unit else neighbours.unit_rows(embeddings, name)
        if len(items) != len(embeddings):
            raise UserError(f"{directory}: {len(embeddings)} embeddings but {len(items)} items.")
        stored, scales = encode(embeddings, dtype)
        encoded = [os.fsencode(path) for path, _, _ in items]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(path) for path in encoded], out=offsets[1:])
        needed = stored.nbytes + int(offsets[-1]) + 8 * 3 * len(items)
        with replacing_dir(directory, needed) as partial:
            os.makedirs(partial)
            np.save(os.path.join(partial, "embeddings.npy"), stored)
            if scales is not None:
                np.save(os.path.join(partial, "scales.npy"), scales)
            with open(os.path.join(partial, "paths.bin"), "wb") as file:
                file.write(b"".join(encoded))
            np.save(os.path.join(partial, "path_offsets.npy"), offsets)
            np.save(os.path.join(partial, "sizes.npy"), np.array([size for _, size, _ in items], np.int64))
            np.save(os.path.join(partial, "mtimes.npy"), np.array([mtime for _, _, mtime in items], np.int64))
            if structure is not None:
                structure.save(os.path.join(partial, ann.structure_file(structure.backend)))
            with open(os.path.join(partial, "shard.json"), "w", encoding="utf-8") as file:
                json.dump({"format_version": SHARD_FORMAT_VERSION, "count": len(items),
                           "embedding_dim": int(embeddings.shape[1]), "dtype": dtype, "unit_rows": True}, file)
        return cls.open(directory)

    @classmethod
    def open(cls, directory):
        """Opens a shard memory-mapped, checking that its files agree with one another.

        Raises:
            UserError: a file is missing, cut short or inconsistent: one line naming the shard.
        """
        try:
            with open(os.path.join(directory, "shard.json"), encoding="utf-8") as file:
                info = json.load(file)
            count, dim, dtype = int(info["count"]), int(info["embedding_dim"]), info["dtype"]
            embeddings = np.load(os.path.join(directory, "embeddings.npy"), mmap_mode="r")
            scales = (np.load(os.path.join(directory, "scales.npy"), mmap_mode="r")
                      if dtype == "int8" else None)
            offsets = np.load(os.path.join(directory, "path_offsets.npy"), mmap_mode="r")
            sizes = np.load(os.path.join(directory, "sizes.npy"), mmap_mode="r")
            mtimes = np.load(os.path.join(directory, "mtimes.npy"), mmap_mode="r")
            blob_path = os.path.join(directory, "paths.bin")
            blob = (np.memmap(blob_path, np.uint8, mode="r") if os.path.getsize(blob_path)
                    else np.zeros(0, np.uint8))  # numpy cannot map an empty file
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise UserError(f"shard {directory} is damaged ({type(error).__name__}: {error}); "
                            "run python -m pnpp_tf.index again to embed its images anew.") from error
        problem = _inconsistency(embeddings, scales, offsets, sizes, mtimes, blob, count, dim, dtype)
        if problem:
            raise UserError(f"shard {directory} is damaged ({problem}); run python -m pnpp_tf.index "
                            "again to embed its images anew.")
        return cls(directory, embeddings, scales, blob, offsets, sizes, mtimes, info.get("unit_rows", False))

    def read_into_memory(self):
        """Reads the stored rows (and int8 scales) into memory instead of mapping them."""
        self.embeddings = self._stored = np.array(self._stored)
        if self.scales is not None:
            self.scales = self._scales = np.array(self._scales)

    def __len__(self):
        return len(self.sizes)

    @property
    def dtype(self):
        return "int8" if self.scales is not None else str(self.embeddings.dtype)

    def relative_path(self, row):
        """The path of item `row` relative to the catalogue's root."""
        start, stop = int(self._path_offsets[row]), int(self._path_offsets[row + 1])
        return os.fsdecode(bytes(self._paths_blob[start:stop]))

    def relative_paths(self):
        """Every item's relative path, in row order."""
        blob = bytes(self._paths_blob)
        offsets = np.asarray(self._path_offsets)
        return [os.fsdecode(blob[offsets[i]:offsets[i + 1]]) for i in range(len(self))]

    def keys(self):
        """[(relative path, size, mtime_ns)] of every item: what tells a changed file."""
        return list(zip(self.relative_paths(), np.asarray(self.sizes).tolist(), np.asarray(self.mtimes).tolist()))

    def decoded(self, rows=None):
        """float32 rows as stored (int8 rows scaled back); all rows, or those of the int array `rows`."""
        if rows is None:
            out = np.empty(self.embeddings.shape, np.float32)
            for start in range(0, len(self), _DECODE_ROWS):
                out[start:start + _DECODE_ROWS] = self._decode_block(start, start + _DECODE_ROWS)
            return out
        rows = np.asarray(rows, np.int64)
        return decode(self._stored[rows], None if self._scales is None else self._scales[rows])

    def unit_rows(self, rows=None):
        """float32 rows as they are scored: all rows, or those of the int array `rows`.

        The decoded rows, which are unit length (see the module); for a float32 shard and all
        rows, the mapped file itself.
        """
        if not self._stored_unit:
            return neighbours.unit_rows(self.decoded(rows), f"embeddings of shard {self.directory}")
        if rows is None and self._scales is None and self._stored.dtype == np.float32:
            return self._stored
        return self.decoded(rows)

    def unit_block(self, start, stop):
        """`unit_rows` of rows start:stop; for a float32 shard a view of the mapped file."""
        rows = self._decode_block(start, stop)
        if not self._stored_unit:
            rows = neighbours.unit_rows(rows, f"embeddings of shard {self.directory}")
        return rows

    def _decode_block(self, start, stop):
        return decode(self._stored[start:stop], None if self._scales is None else self._scales[start:stop])

    def structure_path(self, backend):
        """Where this shard's structure for `backend` is (it may not exist)."""
        return os.path.join(self.directory, ann.structure_file(backend))


def encode(embeddings, dtype):
    """float32 unit rows [n, D] -> (stored array in `dtype`, float32 [n] scales for int8 or None).

    int8: codes = rint(row * 127 / max |row|), and scale = 1 / ||codes||, so that the decoded
    row codes * scale is unit length (a zero row: zero codes, scale 1).
    """
    if dtype not in DTYPES:
        raise UserError(f"--index_dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    if dtype != "int8":
        return embeddings.astype(dtype), None
    largest = np.abs(embeddings).max(axis=1)
    step = np.where(largest > 0, largest / _INT8_MAX, 1.0).astype(np.float32)
    stored = np.clip(np.rint(embeddings / step[:, None]), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    norms = np.sqrt(np.einsum("ij,ij->i", stored, stored, dtype=np.float64))
    scales = np.where(norms > 0, 1.0 / np.maximum(norms, 1.0), 1.0).astype(np.float32)
    return stored, scales


def decode(stored, scales):
    """The inverse of `encode`, to float32."""
    rows = np.asarray(stored, np.float32)
    return rows if scales is None else rows * np.asarray(scales, np.float32)[:, None]


def _inconsistency(embeddings, scales, offsets, sizes, mtimes, blob, count, dim, dtype):
    """What is wrong with a shard's opened files, or None."""
    if dtype not in DTYPES:
        return f"dtype {dtype!r}"
    if embeddings.shape != (count, dim) or str(embeddings.dtype) != dtype:
        return f"embeddings.npy is {embeddings.dtype} {embeddings.shape}, not {dtype} ({count}, {dim})"
    if scales is not None and scales.shape != (count,):
        return f"scales.npy holds {scales.shape}, not ({count},)"
    if sizes.shape != (count,) or mtimes.shape != (count,) or offsets.shape != (count + 1,):
        return "sizes, mtimes or path offsets do not hold one entry per item"
    if int(offsets[-1]) != len(blob):
        return f"paths.bin holds {len(blob)} bytes, not {int(offsets[-1])}"
    return None
