"""The size read from every format's header is the size the decoder makes, and --max_pixels
refuses exactly the images over it, before decoding."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from odd_images import write_odd_images
from pnpp_tf.data import image_header, pipeline
from pnpp_tf.data.image_check import check_images

WIDTH, HEIGHT = 30, 20
PIXELS = WIDTH * HEIGHT


def _exif():
    exif = Image.Exif()
    exif[0x010E] = "a description"  # ImageDescription: makes a WebP extended (VP8X)
    return exif.tobytes()


def write_kinds(directory):
    """{name: path} of a WIDTH x HEIGHT image in every format and variant the decoder reads."""
    good, _ = write_odd_images(directory)
    rgb = Image.open(good["rgb.png"]).convert("RGB")
    extra = {
        "progressive.jpg": dict(progressive=True),  # SOF2
        "exif.jpg": dict(exif=_exif()),  # APP1 before the frame header
        "lossless.webp": dict(lossless=True),  # VP8L
        "extended.webp": dict(exif=_exif()),  # VP8X
    }
    for name, options in extra.items():
        rgb.save(os.path.join(directory, name), **options)
        good[name] = os.path.join(directory, name)
    good["top_down.bmp"] = _patched(good["rgb.bmp"], directory, "top_down.bmp", 22, (-HEIGHT).to_bytes(4, "little", signed=True))
    # A GIF whose logical screen is smaller than its frame: the decoder makes the frame's size.
    good["small_screen.gif"] = _patched(good["animated.gif"], directory, "small_screen.gif", 6, bytes([4, 0, 4, 0]))
    return good


def _patched(source, directory, name, offset, replacement):
    data = bytearray(open(source, "rb").read())
    data[offset:offset + len(replacement)] = replacement
    path = os.path.join(directory, name)
    with open(path, "wb") as file:
        file.write(bytes(data))
    return path


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    return write_kinds(str(tmp_path_factory.mktemp("kinds")))


def pixels_in_frames(name):
    return 2 * PIXELS if name.endswith(".gif") else PIXELS  # the GIFs hold two frames


def test_every_format_reads_the_size_the_decoder_makes(kinds):
    for name, path in kinds.items():
        contents = tf.io.read_file(path)
        height, width, pixels = (int(v) for v in image_header.image_size(contents))
        decoded = tf.io.decode_image(contents, channels=3, expand_animations=False)
        assert (height, width, 3) == tuple(decoded.shape) == (HEIGHT, WIDTH, 3), name
        assert pixels == pixels_in_frames(name), name


def test_max_pixels_refuses_exactly_the_larger_images_undecoded(kinds):
    paths = list(kinds.values())
    budget = 2 * PIXELS  # every image fits, every GIF's frames too
    assert not check_images(paths, max_pixels=budget).bad
    assert all(pipeline.decode_image(path, budget).shape == (HEIGHT, WIDTH, 3) for path in paths)

    result = check_images(paths, max_pixels=PIXELS)  # only the GIFs' two frames are over
    gifs = sorted(path for name, path in kinds.items() if name.endswith(".gif"))
    assert sorted(result.too_large) == sorted(path for path, _ in result.bad) == gifs
    for path, reason in result.bad:
        assert reason == f"{WIDTH}x{HEIGHT}, {2 * PIXELS} pixels in all its frames, more than max_pixels={PIXELS}"

    result = check_images(paths, max_pixels=PIXELS - 1)
    assert sorted(result.too_large) == sorted(paths)
    assert dict(result.bad)[kinds["rgb.jpg"]] == f"{WIDTH}x{HEIGHT} = {PIXELS} pixels, more than max_pixels={PIXELS - 1}"
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{kinds['rgb.webp']} is {WIDTH}x{HEIGHT} = {PIXELS}"):
        pipeline.decode_image(kinds["rgb.webp"], PIXELS - 1)


def claims(kinds, directory):
    """{name: (path, width, height)}: real files whose headers are rewritten to claim a huge
    size; the pixel data (and the PNG's CRC) no longer match, so only the header was read."""
    huge = {
        "png": ("rgb.png", 16, (100_000).to_bytes(4, "big") + (90_000).to_bytes(4, "big"), 100_000, 90_000),
        "bmp": ("rgb.bmp", 18, (70_000).to_bytes(4, "little") + (60_000).to_bytes(4, "little"), 70_000, 60_000),
        "webp": ("extended.webp", 24, (16383).to_bytes(3, "little") + (9999).to_bytes(3, "little"), 16384, 10000),
    }
    found = {}
    for name, (source, offset, replacement, width, height) in huge.items():
        found[name] = (_patched(kinds[source], directory, f"claim.{name}", offset, replacement), width, height)
    # The frame header of a progressive JPEG (SOF2: FF C2, length, precision, height, width).
    data = open(kinds["progressive.jpg"], "rb").read()
    sof = data.index(b"\xff\xc2")
    found["jpg"] = (_patched(kinds["progressive.jpg"], directory, "claim.jpg", sof + 5,
                             (50_000).to_bytes(2, "big") + (60_000).to_bytes(2, "big")), 60_000, 50_000)
    return found


def test_a_claimed_huge_size_is_refused_from_the_header(kinds, tmp_path):
    for name, (path, width, height) in claims(kinds, str(tmp_path)).items():
        result = check_images([path])
        assert result.too_large == [path], name
        assert result.bad[0][1] == (f"{width}x{height} = {width * height} pixels, more than "
                                    f"max_pixels={image_header.DEFAULT_MAX_PIXELS}"), name


def test_gif_frames_count_whatever_the_logical_screen_says(tmp_path):
    # Three frames of solid colours (no frame can be cropped to a changed area).
    frames = [Image.new("RGB", (WIDTH, HEIGHT), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = str(tmp_path / "three.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:], optimize=False)
    contents = tf.io.read_file(path)
    assert [int(v) for v in image_header.image_size(contents)] == [HEIGHT, WIDTH, 3 * PIXELS]
    assert check_images([path], max_pixels=3 * PIXELS).bad == []
    assert check_images([path], max_pixels=3 * PIXELS - 1).too_large == [path]


def test_unsized_and_unknown_formats(tmp_path):
    jxl = tmp_path / "image.jxl"
    jxl.write_bytes(b"\xff\x0a" + bytes(64))  # a JPEG XL codestream: the decoder would read it
    text = tmp_path / "text.png"
    text.write_text("not an image")
    result = check_images([str(jxl), str(text)])
    reasons = dict(result.bad)
    assert reasons[str(jxl)] == image_header.UNSIZED and not result.too_large
    assert reasons[str(text)].startswith("Unknown image file format")  # left to the decoder
    assert [image_header.IMAGE_FORMATS[int(image_header.image_format(tf.io.read_file(str(p))))]
            for p in (jxl, text)] == ["JPEG XL", "unknown"]


def test_a_cut_header_gives_no_size(kinds, tmp_path):
    cut = tmp_path / "cut.png"
    cut.write_bytes(open(kinds["rgb.png"], "rb").read()[:20])  # the height is missing
    assert dict(check_images([str(cut)]).bad)[str(cut)] == image_header.UNREADABLE
    np.testing.assert_array_equal(image_header.image_size(tf.io.read_file(str(cut)))[0], 0)
