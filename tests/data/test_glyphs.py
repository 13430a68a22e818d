"""Tests for pnpp_tf.data.glyphs."""

import json
import os
import unicodedata

import numpy as np
import pytest
from matplotlib import ft2font
from PIL import Image

from pnpp_tf.data import glyphs

NEAR_IDENTICAL = 0.015  # normalized L1 distance between two renders' ink


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("glyphs") / "data"
    data_dir.mkdir()  # An existing empty directory is fine.
    return str(data_dir), glyphs.ensure_glyphs(str(data_dir))


def _images(data_dir, split):
    """Yields (class_name, font_stem, uint8 array) for every image of `split`."""
    for class_name in sorted(os.listdir(os.path.join(data_dir, split))):
        for file_name in sorted(os.listdir(os.path.join(data_dir, split, class_name))):
            image = Image.open(os.path.join(data_dir, split, class_name, file_name))
            yield class_name, os.path.splitext(file_name)[0], np.asarray(image)


def _distance(a, b):
    ink_a, ink_b = 1 - a / 255.0, 1 - b / 255.0
    return np.abs(ink_a - ink_b).sum() / max(ink_a.sum(), ink_b.sum())


def test_train_split(dataset):
    data_dir, manifest = dataset
    classes = sorted(os.listdir(os.path.join(data_dir, "train")))
    assert len(classes) == 62 and classes == sorted(manifest["train_classes"])
    assert "0041_LATIN_CAPITAL_LETTER_A" in classes
    assert "0061_LATIN_SMALL_LETTER_A" in classes and "0039_DIGIT_NINE" in classes
    for class_name in classes:
        files = os.listdir(os.path.join(data_dir, "train", class_name))
        assert len(files) >= 15, class_name
        assert all(f.endswith(".png") for f in files)
    assert manifest["counts"]["train_fonts"] >= 20


def test_test_split(dataset):
    data_dir, manifest = dataset
    classes = sorted(os.listdir(os.path.join(data_dir, "test")))
    assert classes == sorted(manifest["test_classes"])
    assert len(classes) >= 60
    assert not set(classes) & set(manifest["train_classes"])
    for class_name in classes:
        assert class_name.split("_")[1] in ("GREEK", "CYRILLIC"), class_name
        assert len(os.listdir(os.path.join(data_dir, "test", class_name))) >= 8
    dropped = {d["character"] for d in manifest["dropped"]}
    assert {"\u0410", "\u041e", "\u0420", "\u043e"} <= dropped  # Cyrillic А О Р о.
    assert {"\u0391", "\u039f", "\u03a1", "\u03bf"}.isdisjoint(dropped)  # Greek Α Ο Ρ ο.
    # Case pairs differ in size, so both cases of Cyrillic es are kept.
    kept = set(manifest["characters"][c] for c in classes)
    assert {"\u0421", "\u0441"} <= kept
    assert manifest["counts"]["test_fonts"] >= 16


def test_counts_match_files(dataset):
    data_dir, manifest = dataset
    for split in ("train", "test"):
        n = sum(1 for _ in os.scandir(os.path.join(data_dir, split)))
        images = sum(len(files) for _, _, files in os.walk(os.path.join(data_dir, split)))
        assert manifest["counts"][f"{split}_classes"] == n
        assert manifest["counts"][f"{split}_images"] == images
    with open(os.path.join(data_dir, "manifest.json"), encoding="utf-8") as f:
        assert json.load(f) == manifest
    for class_name, ch in manifest["characters"].items():
        assert class_name == f"{ord(ch):04X}_{unicodedata.name(ch).replace(' ', '_')}"


def test_test_classes_visually_distinct(dataset):
    data_dir, _ = dataset
    by_font = {}
    for class_name, font, image in _images(data_dir, "test"):
        by_font.setdefault(font, {})[class_name] = image
    for font, images in by_font.items():
        names = sorted(images)
        ink = 1 - np.stack([images[c] for c in names]).reshape(len(names), -1) / 255.0
        for i in range(len(names) - 1):
            distance = np.abs(ink[i + 1:] - ink[i]).sum(axis=1) / np.maximum(
                ink[i + 1:].sum(axis=1), ink[i].sum())
            j = int(np.argmin(distance))
            assert distance[j] > NEAR_IDENTICAL, (font, names[i], names[i + 1 + j])


def test_distance_flags_homoglyphs():
    # Sanity check of the metric above: Greek Alpha and Cyrillic A coincide.
    alpha = glyphs.render_glyph("\u0391", "DejaVuSans.ttf", 64)
    cyrillic_a = glyphs.render_glyph("\u0410", "DejaVuSans.ttf", 64)
    latin_a = glyphs.render_glyph("a", "DejaVuSans.ttf", 64)
    assert _distance(alpha, cyrillic_a) <= NEAR_IDENTICAL
    assert _distance(alpha, latin_a) > NEAR_IDENTICAL


def test_images_are_real_glyphs(dataset):
    data_dir, manifest = dataset
    font_dir = glyphs.font_dir()
    missing = chr(0x10FFFD)  # A private-use code point no font maps.
    notdef = {}
    for font_file in manifest["fonts"]:
        assert ft2font.FT2Font(os.path.join(font_dir, font_file)).get_char_index(0x10FFFD) == 0
        notdef[os.path.splitext(font_file)[0]] = glyphs.render_glyph(missing, font_file, 64)
    for split in ("train", "test"):
        for class_name, font, image in _images(data_dir, split):
            ch = manifest["characters"][class_name]
            face = ft2font.FT2Font(os.path.join(font_dir, font + ".ttf"))
            assert face.get_char_index(ord(ch)) != 0, (class_name, font)
            assert image.shape == (64, 64) and image.dtype == np.uint8
            assert _distance(image, notdef[font]) > NEAR_IDENTICAL, (class_name, font)
            # Black glyph on white, not clipped at the borders.
            assert image.min() < 64, (class_name, font)
            border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
            assert border.min() == 255, (class_name, font)


def test_lowercase_smaller_than_capitals():
    def ink_rows(ch):
        return np.nonzero((glyphs.render_glyph(ch, "DejaVuSans.ttf") < 128).any(axis=1))[0]

    capital, small = ink_rows("\u0421"), ink_rows("\u0441")  # Cyrillic С and с.
    assert small.max() == pytest.approx(capital.max(), abs=1)  # Same baseline.
    assert capital.max() - capital.min() > 1.2 * (small.max() - small.min())


def test_second_call_does_not_render(dataset):
    data_dir, manifest = dataset
    paths = [os.path.join(data_dir, "manifest.json"),
             os.path.join(data_dir, "train", manifest["train_classes"][0], "DejaVuSans.png")]
    before = [os.stat(p).st_mtime_ns for p in paths] + [os.stat(data_dir).st_ino]
    assert glyphs.ensure_glyphs(data_dir) == manifest
    assert [os.stat(p).st_mtime_ns for p in paths] + [os.stat(data_dir).st_ino] == before


def test_outdated_dataset_is_replaced(tmp_path):
    data_dir = tmp_path / "glyphs"
    (data_dir / "train" / "old_class").mkdir(parents=True)
    outdated = {"name": "glyphs", "version": glyphs.GLYPHS_VERSION - 1, "image_size": 32}
    (data_dir / "manifest.json").write_text(json.dumps(outdated))
    manifest = glyphs.ensure_glyphs(str(data_dir), image_size=32)
    assert manifest["version"] == glyphs.GLYPHS_VERSION and manifest["image_size"] == 32
    assert "old_class" not in os.listdir(data_dir / "train")
    _, _, image = next(_images(str(data_dir), "test"))
    assert image.shape == (32, 32)
    assert os.listdir(tmp_path) == ["glyphs"]  # No temporary directories left.


@pytest.mark.parametrize("content", [None, {"name": "something else"}])
def test_foreign_dir_raises(tmp_path, content):
    data_dir = tmp_path / "mine"
    data_dir.mkdir()
    if content is None:
        (data_dir / "notes.txt").write_text("hello")
    else:
        (data_dir / "manifest.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match="choose an") as info:
        glyphs.ensure_glyphs(str(data_dir))
    assert str(data_dir) in str(info.value)
    assert sorted(os.listdir(data_dir)) == [("notes.txt" if content is None else "manifest.json")]
    assert os.listdir(tmp_path) == ["mine"]
