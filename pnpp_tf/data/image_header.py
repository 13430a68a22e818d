"""An image's size from its file header, before any decoding: the pixel budget of every decode.

`tf.io.decode_image` allocates whatever width x height a file claims, so a 400 KB PNG of
20000 x 20000 pixels costs 6 GB (uint8 pixels plus the float32 copy the pipeline makes). The
size is read here, with TensorFlow ops, so that one reader serves the tf.data pipelines, the
start-up check (`pnpp_tf.data.image_check`, one traced call per file) and the serving signature
(in its graph), through `pnpp_tf.data.pipeline.decode_image_bytes`.

It reads every format the decoder reads, recognised by the magic bytes the decoder looks at:

    JPEG     the frame header (SOF0-SOF15: baseline, progressive, ...), via libjpeg
    PNG      IHDR
    GIF      every frame's descriptor: giflib decodes them all, even when only the first is kept
    BMP      the info header, at the offsets TensorFlow's BMP decoder reads
    WebP     the VP8 (lossy), VP8L (lossless) or VP8X (extended) chunk
    JPEG XL  not read (its size is bit-packed, possibly inside ISO boxes): refused as unsized

Anything else is left to the decoder, which rejects it unallocated ("Unknown image file format").
"""

import tensorflow as tf

# 2**25 pixels, e.g. 8192 x 4096: a 48-megapixel phone photo is refused, a 12-megapixel one is not.
# An image in flight costs about DECODED_BYTES_PER_PIXEL bytes per pixel, so about 500 MB at most.
DEFAULT_MAX_PIXELS = 1 << 25
DECODED_BYTES_PER_PIXEL = 3 + 4 * 3  # the decoder's uint8 RGB, then the pipeline's float32 copy

IMAGE_FORMATS = ("unknown", "JPEG", "PNG", "GIF", "BMP", "WebP", "JPEG XL")
UNKNOWN, JPEG, PNG, GIF, BMP, WEBP, JPEG_XL = range(len(IMAGE_FORMATS))
UNREADABLE = "the image header gives no positive width and height (truncated or corrupt file)"
UNSIZED = "a JPEG XL image, whose size is not read before decoding; convert it to PNG or JPEG"

_HEADER_BYTES = 32  # every fixed offset read below lies within the first 32 bytes
# (format, {offset: bytes}) as tensorflow/core/kernels/image/decode_image_op.cc classifies files,
# within the first 16 bytes. A PNG must start with IHDR, as libpng requires.
_MAGIC = (
    (JPEG, {0: b"\xff\xd8\xff"}),
    (PNG, {0: b"\x89PNG\r\n\x1a\n", 12: b"IHDR"}),
    (GIF, {0: b"GIF8"}),
    (BMP, {0: b"BM"}),
    (WEBP, {0: b"RIFF", 8: b"WEBP"}),
    (JPEG_XL, {0: b"\xff\x0a"}),  # a bare codestream
    (JPEG_XL, {0: b"\0\0\0\x0cJXL \r\n\x87\n"}),  # the ISO box container
)
# The integers at fixed offsets: (offset, bytes, big-endian). Read in one product of the header
# bytes with a weight matrix: the header is checked for every image, so few ops count.
_FIELDS = {
    "png_width": (16, 4, True), "png_height": (20, 4, True),
    "bmp_width": (18, 4, False), "bmp_height": (22, 4, False),
    "webp_chunk": (12, 4, True),  # VP8 , VP8L or VP8X
    "vp8_width": (26, 2, False), "vp8_height": (28, 2, False),  # 14 bits each, then 2 of scale
    "vp8l_size": (21, 4, False),  # after the 0x2f signature: 14 bits of width - 1, 14 of height - 1
    "vp8x_width": (24, 3, False), "vp8x_height": (27, 3, False),  # the canvas, minus 1
}
_WEBP_CHUNKS = {name: int.from_bytes(name, "big") for name in (b"VP8 ", b"VP8L", b"VP8X")}


def _magic_tables():
    """([rows][16] bytes, [rows][16] which of them count) of `_MAGIC`, one row per magic."""
    values = [[0] * 16 for _ in _MAGIC]
    masks = [[False] * 16 for _ in _MAGIC]
    for row, (_, parts) in enumerate(_MAGIC):
        for offset, magic in parts.items():
            values[row][offset:offset + len(magic)] = list(magic)
            masks[row][offset:offset + len(magic)] = [True] * len(magic)
    return values, masks


def _field_weights():
    """[32][fields] weights: the header's bytes times them give the `_FIELDS` integers."""
    weights = [[0.0] * len(_FIELDS) for _ in range(_HEADER_BYTES)]
    for column, (offset, size, big_endian) in enumerate(_FIELDS.values()):
        for i in range(size):
            weights[offset + (size - 1 - i if big_endian else i)][column] = float(256 ** i)
    return weights


def image_format(contents):
    """The index into `IMAGE_FORMATS` of an encoded image (a scalar tf.string), int64."""
    return _format(_header_bytes(contents))


def image_size(contents):
    """(height, width, pixels) int64 of the image the decoder would make of `contents`.

    pixels is height x width, except for a GIF, where it is at least all its frames' pixels.
    All three are 0 for an unknown format or JPEG XL; height or width is 0 (or negative) when
    the header is cut short or corrupt. A JPEG whose header libjpeg cannot parse raises the
    decoder's own `InvalidArgumentError`.
    """
    return _read(contents)[1:]


def _read(contents):
    """(format, height, width, pixels), from one read of the header."""
    header = _header_bytes(contents)
    fmt = _format(header)
    fields = dict(zip(_FIELDS, tf.unstack(tf.cast(tf.linalg.matvec(
        tf.constant(_field_weights(), tf.float64), tf.cast(header, tf.float64), transpose_a=True), tf.int64))))
    zero = tf.zeros([3], tf.int64)
    # Only these two read beyond the header, or fail on another format: computed when chosen.
    jpeg = tf.cond(fmt == JPEG, lambda: tf.stack(_jpeg_size(contents)), lambda: zero)
    gif = tf.cond(fmt == GIF, lambda: tf.stack(_gif_size(contents)), lambda: zero)
    table = tf.stack([zero, jpeg, _sides(fields["png_height"], fields["png_width"]), gif,
                      _bmp_size(fields), _webp_size(fields), zero])
    height, width, pixels = tf.unstack(tf.gather(table, fmt))
    return fmt, height, width, pixels


def header_problem(contents, max_pixels):
    """Why `contents` must not be decoded, judged from its header alone.

    Args:
        contents: an encoded image, a scalar tf.string.
        max_pixels: the largest number of pixels (`image_size`) allowed.

    Returns:
        Scalar tensors (refuse: bool, too_large: bool, reason: string), reason being "" when
        the image may be decoded, e.g. "20000x20000 = 400000000 pixels, more than
        max_pixels=33554432" or `UNREADABLE`. An unknown format is not refused here: the
        decoder rejects it without allocating.
    """
    fmt, height, width, pixels = _read(contents)
    max_pixels = tf.cast(max_pixels, tf.int64)
    known = tf.logical_and(fmt != UNKNOWN, fmt != JPEG_XL)
    unreadable = tf.logical_and(known, tf.logical_or(height <= 0, width <= 0))
    too_large = tf.logical_and(tf.logical_and(known, tf.logical_not(unreadable)), pixels > max_pixels)
    refuse = tf.logical_or(fmt == JPEG_XL, tf.logical_or(unreadable, too_large))

    def reason():
        size = tf.where(pixels == height * width,
                        tf.strings.format("{}x{} = {} pixels", (width, height, pixels)),
                        tf.strings.format("{}x{}, {} pixels in all its frames", (width, height, pixels)))
        over = tf.strings.join([size, ", more than max_pixels=", tf.strings.as_string(max_pixels)])
        return tf.where(fmt == JPEG_XL, UNSIZED, tf.where(unreadable, UNREADABLE, over))

    # Formatted only for a refused image.
    return refuse, too_large, tf.cond(refuse, reason, lambda: tf.constant(""))


def _header_bytes(contents):
    """The first `_HEADER_BYTES` bytes, int64, zero-padded however short the input is."""
    head = tf.strings.substr(contents, 0, _HEADER_BYTES)
    return tf.cast(tf.io.decode_raw(head, tf.uint8, fixed_length=_HEADER_BYTES), tf.int64)


def _format(header):
    """The `IMAGE_FORMATS` index of the header bytes (int64 [32])."""
    values, masks = _magic_tables()
    rows = tf.reduce_all(tf.logical_or(tf.equal(header[:16], tf.constant(values, tf.int64)), tf.logical_not(masks)),
                         axis=1)
    # At most one row matches: no magic is a prefix of another.
    formats = tf.constant([fmt for fmt, _ in _MAGIC], tf.int64)
    return tf.reduce_max(tf.where(rows, formats, tf.zeros_like(formats)))


def _sides(height, width):
    return tf.stack([height, width, height * width])


def _jpeg_size(contents):
    shape = tf.io.extract_jpeg_shape(contents, output_type=tf.int64)
    return shape[0], shape[1], shape[0] * shape[1]


def _bmp_size(fields):
    # Signed 32-bit, as the decoder reads them; a negative height means rows stored top-down.
    width, height = (tf.where(value >= 1 << 31, value - (1 << 32), value)
                     for value in (fields["bmp_width"], fields["bmp_height"]))
    return _sides(tf.abs(height), width)


def _webp_size(fields):
    chunk, bits = fields["webp_chunk"], fields["vp8l_size"]
    candidates = {  # chunk: (height, width)
        b"VP8 ": (fields["vp8_height"] % (1 << 14), fields["vp8_width"] % (1 << 14)),
        b"VP8L": (bits // (1 << 14) % (1 << 14) + 1, bits % (1 << 14) + 1),
        b"VP8X": (fields["vp8x_height"] + 1, fields["vp8x_width"] + 1),
    }
    height = width = tf.constant(0, tf.int64)
    for name, (chunk_height, chunk_width) in candidates.items():
        height = tf.where(chunk == _WEBP_CHUNKS[name], chunk_height, height)
        width = tf.where(chunk == _WEBP_CHUNKS[name], chunk_width, width)
    return _sides(height, width)


def _gif_size(contents):
    """The largest frame's (height, width) and the pixels of the canvas or of all frames.

    TensorFlow's decoder makes an image of the largest frame's width x height, after giflib has
    decoded every frame (one byte per pixel each), whatever the logical screen says; so the
    frames are walked: blocks of the file, then the sub-blocks of each, one per iteration.
    """
    data = tf.concat([tf.io.decode_raw(contents, tf.uint8), tf.zeros([16], tf.uint8)], 0)
    length = tf.size(data, out_type=tf.int64) - 16

    def byte(i):
        return tf.cast(tf.gather(data, tf.minimum(i, length + 15)), tf.int64)

    def colour_table(flags):
        # A colour table of 2^(n+1) RGB entries follows when the top bit of its flags is set.
        return tf.where(flags >= 128, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), flags % 8), 0)

    def step(position, in_blocks, height, width, pixels):
        value = byte(position)
        is_frame = tf.logical_and(tf.logical_not(in_blocks), value == 0x2C)
        is_extension = tf.logical_and(tf.logical_not(in_blocks), value == 0x21)
        frame_width = byte(position + 5) + 256 * byte(position + 6)
        frame_height = byte(position + 7) + 256 * byte(position + 8)
        # A frame: 10 bytes of descriptor, its colour table, the LZW code size, then sub-blocks.
        after_frame = position + 11 + colour_table(byte(position + 9))
        # An extension: its label, then sub-blocks. Anything else (the trailer) ends the walk.
        after_block = tf.where(is_frame, after_frame, tf.where(is_extension, position + 2, length))
        # Within sub-blocks, each byte is the length of the next; 0 ends the run.
        next_position = tf.where(in_blocks, position + 1 + value, after_block)
        still_in_blocks = tf.where(in_blocks, value > 0, tf.logical_or(is_frame, is_extension))
        return (next_position, still_in_blocks,
                tf.where(is_frame, tf.maximum(height, frame_height), height),
                tf.where(is_frame, tf.maximum(width, frame_width), width),
                pixels + tf.where(is_frame, frame_width * frame_height, 0))

    zero = tf.constant(0, tf.int64)
    start = 13 + colour_table(byte(tf.constant(10, tf.int64)))
    _, _, height, width, pixels = tf.while_loop(
        lambda position, *_: position < length, step, (start, tf.constant(False), zero, zero, zero))
    return height, width, tf.maximum(pixels, height * width)
