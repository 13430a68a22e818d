"""The glyphs dataset: characters rendered in the TrueType fonts matplotlib ships.

A class is a character, an image is that character in one typeface. Train classes
are Latin letters and digits; test classes are Greek and Cyrillic letters, minus
those that look like an earlier test letter (e.g. Cyrillic А is Greek Α), so the
split is zero-shot. Images are written once in the folder layout
`<data_dir>/{train,test}/<class_name>/<font_stem>.png` with a `manifest.json`.
"""

import functools
import json
import logging
import os
import shutil
import tempfile
import unicodedata

import matplotlib
import numpy as np
from matplotlib import ft2font
from PIL import Image, ImageDraw, ImageFont

from pnpp_tf.errors import UserError

GLYPHS_VERSION = 1  # bump when rendering changes

FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    # Computer Modern text faces; cmmi10 (old-style digits), cmsy10 and cmex10
    # (symbols at ASCII code points) are left out on purpose.
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf", "cmb10.ttf",
)
FONT_SCALE = 0.64  # font size (em) as a fraction of the image size
BASELINE = 0.75  # baseline height from the top as a fraction of the image size
ANALYSIS_SIZE = 128  # resolution at which look-alike test letters are detected
LOOKALIKE_TOLERANCE = 0.017  # max fraction of ink more than 1 px off the other
MIN_IMAGES = 8  # classes with fewer images are dropped
MANIFEST = "manifest.json"

_logger = logging.getLogger(__name__)


def ensure_glyphs(data_dir: str, image_size: int = 64) -> dict:
    """Renders the glyphs dataset into `data_dir` if it is not already there.

    A complete dataset of the same `GLYPHS_VERSION` and `image_size` is reused
    as is. An earlier glyphs dataset of another version or size is replaced.
    The dataset is rendered into a temporary sibling directory that is then
    renamed to `data_dir`, so `data_dir` never holds a partial dataset.

    Args:
        data_dir: Directory to hold the dataset. It must not exist, be empty or
            hold a glyphs dataset written by this function.
        image_size: Height and width of the square greyscale images in pixels.

    Returns:
        The manifest dict, as stored in `<data_dir>/manifest.json`.

    Raises:
        ValueError: If `data_dir` exists and holds something else.
    """
    data_dir = os.path.abspath(os.fspath(data_dir))
    manifest = _read_manifest(data_dir)
    if _is_current(data_dir, manifest, image_size):
        return manifest
    if os.path.exists(data_dir) and manifest is None and (
            not os.path.isdir(data_dir) or os.listdir(data_dir)):
        raise UserError(
            f"{data_dir} exists and does not hold a glyphs dataset; choose an "
            f"empty or non-existent directory for the glyphs data.")
    parent = os.path.dirname(data_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(data_dir)}.tmp-", dir=parent)
    try:
        manifest = _write_dataset(tmp, image_size, data_dir)
        _install(tmp, data_dir)
    except OSError:
        # Another process may have installed the dataset concurrently.
        manifest = _read_manifest(data_dir)
        if not _is_current(data_dir, manifest, image_size):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def font_dir():
    """Returns the directory of the TrueType fonts bundled with matplotlib."""
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def class_name(ch):
    """Returns the folder name of character `ch`, e.g. "0041_LATIN_CAPITAL_LETTER_A"."""
    return f"{ord(ch):04X}_{unicodedata.name(ch).replace(' ', '_')}"


def train_characters():
    """Returns the 62 train characters: A-Z, a-z and 0-9."""
    return [chr(c) for lo, hi in ((65, 90), (97, 122), (48, 57)) for c in range(lo, hi + 1)]


def candidate_test_characters():
    """Returns the Greek and Russian Cyrillic letters, in code point order."""
    ranges = ((0x391, 0x3A9), (0x3B1, 0x3C9), (0x401, 0x401), (0x410, 0x44F), (0x451, 0x451))
    chars = [chr(c) for lo, hi in ranges for c in range(lo, hi + 1)]
    return [c for c in chars if unicodedata.category(c) in ("Lu", "Ll")]


def fonts_with(ch, fonts=FONT_FILES):
    """Returns the font files among `fonts` that have a glyph for `ch`."""
    return [f for f in fonts if _ft2font(f).get_char_index(ord(ch)) != 0]


def render_glyph(ch, font_file, image_size=64):
    """Renders `ch` black on white, centred on its ink box, on a fixed baseline.

    All glyphs share one font size and baseline, so lowercase letters stay
    smaller than capitals.

    Args:
        ch: The character.
        font_file: A font file name in `font_dir()` (or a full path).
        image_size: Height and width of the image in pixels.

    Returns:
        A uint8 array of shape `(image_size, image_size)`, 255 for background.
    """
    font = _font(font_file, round(FONT_SCALE * image_size))
    left, _, right, _ = font.getbbox(ch, anchor="ls")
    image = Image.new("L", (image_size, image_size), 255)
    x = (image_size - (right - left)) / 2 - left
    ImageDraw.Draw(image).text((x, BASELINE * image_size), ch, font=font, fill=0, anchor="ls")
    return np.asarray(image)


def select_test_characters(chars=None):
    """Leaves out test characters that look like an earlier one.

    Two glyphs look alike in a font if, rendered at `ANALYSIS_SIZE`, at most
    `LOOKALIKE_TOLERANCE` of either's ink lies more than one pixel away from the
    other's. A character that looks like an earlier kept one in at least half of
    their shared fonts is dropped; otherwise only its look-alike renders are.

    Args:
        chars: Candidate characters in priority order; defaults to
            `candidate_test_characters()` (Greek before Cyrillic).

    Returns:
        `(kept, dropped, omitted)`: `kept` maps each kept character to its font
        files; `dropped` lists `{"character", "class", "reason"}` dicts and
        `omitted` lists `{"class", "font", "reason"}` dicts of left-out renders.
    """
    chars = candidate_test_characters() if chars is None else list(chars)
    fonts_of = {ch: fonts_with(ch) for ch in chars}
    alike = {}  # (character, earlier character) -> fonts in which they look alike.
    for f in FONT_FILES:
        cs = [ch for ch in chars if f in fonts_of[ch]]
        if not cs:
            continue
        ink = np.stack([render_glyph(ch, f, ANALYSIS_SIZE) < 128 for ch in cs])
        flat = ink.reshape(len(cs), -1).astype(np.float32)
        n = flat.sum(axis=1)
        off = n[:, None] - flat @ _dilate(ink).reshape(len(cs), -1).astype(np.float32).T
        off = np.maximum(off, off.T)  # Ink of either farther than 1 px from the other.
        similar = off <= LOOKALIKE_TOLERANCE * np.maximum(n[:, None], n[None, :])
        for i, j in zip(*np.nonzero(np.triu(similar, 1) & (n[:, None] > 0))):
            alike.setdefault((cs[j], cs[i]), []).append(f)
        for ch in np.array(cs)[n == 0]:  # Blank renders.
            fonts_of[ch].remove(f)
    kept, dropped, omitted = {}, [], []
    for ch in chars:
        same = {k: [f for f in alike.get((ch, k), ()) if f in kept[k]] for k in kept}
        twin = next((k for k, fs in same.items()
                     if fs and 2 * len(fs) >= len(set(fonts_of[ch]) & set(kept[k]))), None)
        distinct = [f for f in fonts_of[ch] if not any(f in fs for fs in same.values())]
        if twin is not None or len(distinct) < MIN_IMAGES:
            reason = (f"looks like {class_name(twin)} in {len(same[twin])} fonts" if twin
                      else f"only {len(distinct)} distinct renders")
            dropped.append({"character": ch, "class": class_name(ch), "reason": reason})
            continue
        kept[ch] = distinct
        omitted += [{"class": class_name(ch), "font": f, "reason": f"looks like {class_name(k)}"}
                    for k, fs in same.items() for f in fs]
    return kept, dropped, omitted


def _dilate(mask):
    """Grows boolean masks (over the last two axes) by one pixel, 8-connected."""
    h, w = mask.shape[-2:]
    padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)])
    return np.any([padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)


@functools.lru_cache(maxsize=None)
def _font(font_file, size):
    return ImageFont.truetype(os.path.join(font_dir(), font_file), size,
                              layout_engine=ImageFont.Layout.BASIC)


@functools.lru_cache(maxsize=None)
def _ft2font(font_file):
    return ft2font.FT2Font(os.path.join(font_dir(), font_file))


def _write_dataset(out_dir, image_size, data_dir):
    """Renders all images into `out_dir` (to become `data_dir`), manifest last."""
    test, dropped, omitted = select_test_characters()
    splits = {"train": {c: fonts_with(c) for c in train_characters()}, "test": test}
    n_images = sum(len(f) for split in splits.values() for f in split.values())
    _logger.info("Rendering glyphs dataset into %s (%d images)", data_dir, n_images)
    counts, classes = {}, {}
    for split, chars in splits.items():
        classes[split], counts[split + "_images"] = [], 0
        for ch, fonts in chars.items():
            class_dir = os.path.join(out_dir, split, class_name(ch))
            os.makedirs(class_dir)
            for f in fonts:
                image = render_glyph(ch, f, image_size)
                if image.min() > 127:  # No ink: skip, never write blanks.
                    continue
                stem = os.path.splitext(f)[0]
                Image.fromarray(image).save(os.path.join(class_dir, stem + ".png"))
                counts[split + "_images"] += 1
            classes[split].append(class_name(ch))
        counts[split + "_classes"] = len(classes[split])
        counts[split + "_fonts"] = len(set().union(*chars.values()))
    manifest = {
        "name": "glyphs", "version": GLYPHS_VERSION, "image_size": image_size,
        "fonts": list(FONT_FILES), "train_classes": classes["train"],
        "test_classes": classes["test"], "dropped": dropped, "omitted": omitted,
        "counts": counts,
        "characters": {class_name(c): c for s in splits.values() for c in s},
    }
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
    return manifest


def _install(tmp, data_dir):
    """Renames `tmp` to `data_dir`, replacing an empty or outdated `data_dir`."""
    if os.path.isdir(data_dir) and not os.listdir(data_dir):
        os.rmdir(data_dir)
    trash = None
    if os.path.exists(data_dir):  # An outdated glyphs dataset.
        trash = tempfile.mkdtemp(prefix=os.path.basename(tmp) + "-old", dir=os.path.dirname(tmp))
        os.rename(data_dir, os.path.join(trash, "old"))
        _logger.info("Replaced the outdated glyphs dataset in %s", data_dir)
    os.rename(tmp, data_dir)
    if trash:
        shutil.rmtree(trash, ignore_errors=True)


def _read_manifest(data_dir):
    try:
        with open(os.path.join(data_dir, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("name") == "glyphs" else None


def _is_current(data_dir, manifest, image_size):
    if not manifest or manifest.get("version") != GLYPHS_VERSION or \
            manifest.get("image_size") != image_size:
        return False
    for split in ("train", "test"):
        n = sum(len(files) for _, _, files in os.walk(os.path.join(data_dir, split)))
        if n != manifest.get("counts", {}).get(split + "_images"):
            return False
    return True
