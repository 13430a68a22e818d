"""The bytes of an image cache entry (`pnpp_tf.data.cache.ImageCache`): written by the cache, read
and checked by the input pipelines (`read_cached_image`), before any of its pixels is used.

An entry that is cut short, changed since it was written, of another format or written for
another image stops the pipeline with one line that starts with `DAMAGED_ENTRY` and names it.
"""

import numpy as np
import tensorflow as tf

# Entries of `pnpp_tf.data.cache.ImageCache`: decoded pixels, read without decoding.
CACHED_IMAGE_SUFFIX = ".tensor"

# An `ImageCache` entry, checked by `read_cached_image` before any of its pixels is used. Integers
# are little-endian int64; offsets in bytes:
#   0    CACHE_ENTRY_MAGIC; its last digits are the format, also part of the entry's name
#   8    checksum: the FarmHash fingerprint (`tf.fingerprint`) of bytes [64, end)
#   16   zeros
#   64   height, width, 3: the shape of the pixels
#   88   P, where the pixels start (a multiple of 64); 96: their length; 104: the entry's size
#   112  n, the length of the source path
#   120  the key digest the entry was written for, 40 hex digits (its name is `ab/cdef....tensor`)
#   160  the source image's path (UTF-8, n bytes, for messages), then zeros up to P
#   P    the pixels, uint8 [height, width, 3] in row-major order, then zeros up to a multiple of 64
# Why the multiples of 64: a slice of a tensor whose ends are both aligned for Eigen (64 bytes at
# most) shares the tensor's buffer, so the checksum reads the entry's bytes where they were decoded
# rather than a copy of them.
CACHE_ENTRY_MAGIC = b"pnppIC02"
DAMAGED_ENTRY = "pnpp_tf: damaged image cache entry"
_ENTRY_REMEDY = "; delete it (or the cache directory) and it is rebuilt from its image"
_ENTRY_HEADER_BYTES = 160
_ENTRY_ALIGNMENT = 64
_MAGIC_INT64 = int(np.frombuffer(CACHE_ENTRY_MAGIC, "<i8")[0])
# Where the header (as int64) holds the magic and zeros, the checksum, the size and the digest: the
# values that `_check_cache_entry` compares, in one comparison, with those it finds.
_CHECKED_FIELDS = [0, 2, 3, 4, 5, 6, 7, 1, 13, 15, 16, 17, 18, 19]


def read_cached_image(path):
    """Reads an `ImageCache` entry as float32 RGB [H, W, 3], after checking it.

    Args:
        path: the entry's path (a scalar tf.string), as `ImageCache.entry_path` gives it.

    Returns:
        The entry's pixels, as float32.

    Raises:
        tf.errors.InvalidArgumentError: the entry is not whole, not of this format, changed since it
            was written, or written for another image (its name is not its key). The message holds
            one line `<DAMAGED_ENTRY> <path>: <what is wrong>; <what to do>` (the path C-escaped by
            `tf.debugging.Assert`; `cache.damaged_entry_of` reads it back).
    """
    ok, describe, raw, header = _check_cache_entry(tf.io.read_file(path), path)
    # The message is put together only for a damaged entry: a sound one costs no formatting.
    message = tf.cond(ok, lambda: tf.constant(""),
                      lambda: tf.strings.join([DAMAGED_ENTRY, " ", path, ": ", describe(), _ENTRY_REMEDY]))
    with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
        image = tf.reshape(tf.slice(raw, header[11:12], header[12:13]), header[8:11])
    image.set_shape([None, None, 3])
    return tf.cast(image, tf.float32)


def cache_entry_problem(contents, path):
    """What `read_cached_image` finds wrong with an entry, found the same way, eagerly.

    Args:
        contents: the entry's bytes.
        path: where they were read from (its name is the key they must have been written for).

    Returns:
        None for a sound entry, else what is wrong, e.g. "cut short (100 of 4160 bytes)".
    """
    ok, describe, _, _ = _check_cache_entry(tf.constant(contents, tf.string), tf.constant(path, tf.string))
    return None if bool(ok) else describe().numpy().decode("utf-8", "replace")


def cache_entry(pixels, digest, source):
    """The bytes of an `ImageCache` entry (laid out as said above `CACHE_ENTRY_MAGIC`).

    Args:
        pixels: uint8 array [height, width, 3].
        digest: the entry's key digest, 40 hex digits.
        source: the image file the pixels come from.
    """
    source = source.encode("utf-8")
    start = -(-(_ENTRY_HEADER_BYTES + len(source)) // _ENTRY_ALIGNMENT) * _ENTRY_ALIGNMENT
    size = -(-(start + pixels.size) // _ENTRY_ALIGNMENT) * _ENTRY_ALIGNMENT
    entry = bytearray(size)
    entry[0:8] = CACHE_ENTRY_MAGIC
    entry[64:120] = np.array([*pixels.shape, start, pixels.size, size, len(source)], "<i8").tobytes()
    entry[120:160] = digest.encode("ascii")
    entry[160:160 + len(source)] = source
    entry[start:start + pixels.size] = np.ascontiguousarray(pixels, np.uint8).tobytes()
    checksum = _entry_checksum(tf.constant(np.frombuffer(entry, np.uint8)[_ENTRY_ALIGNMENT:]))
    entry[8:16] = np.asarray(checksum, "<i8").tobytes()
    return bytes(entry)


def _entry_checksum(data):
    """The FarmHash64 fingerprint of uint8 bytes, as int64 [1]: of the hashes TensorFlow computes in
    graph, the cheapest (about as fast as copying the bytes) and it needs no copy to read them."""
    return tf.bitcast(tf.fingerprint(tf.reshape(data, [1, -1])), tf.int64)


def _check_cache_entry(contents, path):
    """(ok, describe, raw, header): whether the entry `contents` read from `path` is sound, a function
    saying what is wrong when it is not, its bytes as uint8 and its header as int64.

    Each op here is safe on any contents (no slice out of range, nothing decoded that may not
    parse), so that a damaged entry reaches the check rather than an error that names neither it
    nor the damage. Few ops, as each costs about a microsecond per image in a tf.data map.
    """
    raw = tf.io.decode_raw(contents, tf.uint8)
    # Zero-padded when the entry is shorter than a header.
    header = tf.io.decode_raw(contents, tf.int64, little_endian=True, fixed_length=_ENTRY_HEADER_BYTES)
    # The digest of the entry's name, `.../ab/cdef....tensor`, whatever the path's separator.
    name = tf.strings.join([tf.strings.substr(path, -48, 2), tf.strings.substr(path, -45, 38)])
    found = tf.concat([[_MAGIC_INT64, 0, 0, 0, 0, 0, 0], _entry_checksum(raw[_ENTRY_ALIGNMENT:]),
                       tf.shape(raw, out_type=tf.int64), tf.io.decode_raw(name, tf.int64, little_endian=True)], 0)
    matches = tf.equal(found, tf.gather(header, _CHECKED_FIELDS))
    ok = tf.reduce_all(matches)

    def describe():
        size, expected = tf.size(raw, out_type=tf.int64), header[13]
        # A magic cut short counts as cut short, not as another format.
        magic = tf.equal(tf.strings.substr(CACHE_ENTRY_MAGIC, tf.constant(0, tf.int64), tf.minimum(size, 8)),
                         tf.strings.substr(contents, 0, 8))
        source = tf.strings.substr(contents, tf.minimum(size, _ENTRY_HEADER_BYTES),
                                   tf.clip_by_value(header[14], 0, 4096))
        sizes = tf.strings.join([tf.strings.as_string(size), " of ", tf.strings.as_string(expected), " bytes"])
        return tf.case([
            (~magic, lambda: tf.constant(f"not an image cache entry of format {int(CACHE_ENTRY_MAGIC[-2:])} "
                                         "(written by another version of pnpp_tf, or overwritten)")),
            (size < _ENTRY_HEADER_BYTES, lambda: tf.strings.join(
                ["cut short (", tf.strings.as_string(size), " bytes, less than its header)"])),
            (size < expected, lambda: tf.strings.join(["cut short (", sizes, ")"])),
            (size > expected, lambda: tf.strings.join(["too long (", sizes, ")"])),
            (~tf.reduce_all(matches[1:8]), lambda: tf.constant("wrong checksum (changed since it was written)")),
            (~tf.reduce_all(matches[9:]),
             lambda: tf.strings.join(["belongs to another image (it holds the pixels of ", source, ")"])),
        ], default=lambda: tf.constant(""), exclusive=False)

    return ok, describe, raw, header
