"""Damaged image cache entries: named where they are read, never decoded into pixels, rebuilt."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from conftest import write_image

from pnpp_tf.data import cache as cache_module, pipeline
from pnpp_tf.data.cache import DAMAGED_ENTRY, ImageCache, damaged_entry_of

SIDE = 16


@pytest.fixture
def cached(tmp_path):
    """(cache, [image a, image b], [entry a, entry b]) of two tiny images of different sizes."""
    rng = np.random.default_rng(0)
    images = [write_image(str(tmp_path / "images" / "a.png"), rng, size=(20, 18)),
              write_image(str(tmp_path / "images" / "b.png"), rng, size=(17, 24))]
    cache = ImageCache(str(tmp_path / "cache"), SIDE)
    return cache, images, cache.cached_paths(images, progress=False)


def read_pixels(entry):
    return pipeline.read_cached_image(entry).numpy()


def damage_line(error):
    """The one line of the error's message that names the damaged entry."""
    lines = [line for line in str(error).splitlines() if DAMAGED_ENTRY in line]
    assert len(lines) == 1, str(error)
    return lines[0]


def old_format_entry(cache, image):
    """An entry as format 1 wrote it: the serialized uint8 tensor alone."""
    return tf.io.serialize_tensor(cache._encode(image, 10**9)).numpy()  # pylint: disable=protected-access


DAMAGES = {
    # name: (what to write over entry a, given its bytes and entry b's; the words that say so)
    "truncated": (lambda own, other, _: own[:len(own) // 2], "cut short ("),
    "truncated_in_header": (lambda own, other, _: own[:40], "cut short (40 bytes, less than its header)"),
    "emptied": (lambda own, other, _: b"", "cut short (0 bytes"),
    "random_bytes": (lambda own, other, _: np.random.default_rng(7).bytes(len(own)),
                     "not an image cache entry of format 2"),
    "another_images_entry": (lambda own, other, _: other, "belongs to another image (it holds the pixels of "),
    "old_format": (lambda own, other, old: old, "not an image cache entry of format 2"),
    "flipped_pixel": (lambda own, other, _: own[:-100] + bytes([own[-100] ^ 1]) + own[-99:], "wrong checksum"),
    "appended": (lambda own, other, _: own + b"\0", "too long ("),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_entry_is_named_where_it_is_read_and_rebuilt(cached, damage):
    cache, images, (entry, other) = cached
    sound = read_pixels(entry)
    make, words = DAMAGES[damage]
    with open(entry, "rb") as file:
        own = file.read()
    with open(other, "rb") as file:
        others = file.read()
    with open(entry, "wb") as file:
        file.write(make(own, others, old_format_entry(cache, images[0])))

    assert cache.entry_problem(entry).startswith(words)
    # Through the evaluation pipeline, one image a batch: the other image's batch comes out, then
    # the damaged entry stops the dataset before any of its bytes become pixels.
    batches = []
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        for batch in pipeline.eval_dataset([other, entry], 8, batch_size=1).as_numpy_iterator():
            batches.append(batch)
    assert len(batches) == 1
    line = damage_line(raised.value)
    assert f"{DAMAGED_ENTRY} {entry}: {words}" in line
    assert damaged_entry_of(raised.value) == entry
    # Read alone (eagerly), it says the same.
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        pipeline.read_cached_image(entry)
    assert damaged_entry_of(raised.value) == entry and words in str(raised.value)

    assert cache.rebuild([images[0]], progress=False) == []
    assert cache.entry_problem(entry) is None
    np.testing.assert_array_equal(read_pixels(entry), sound)


def test_every_part_of_an_entry_is_checked(cached):
    cache, _, (entry, _) = cached
    with open(entry, "rb") as file:
        sound = file.read()
    start = int(np.frombuffer(sound[88:96], "<i8")[0])
    # Magic, checksum, the zeros, shape, offsets, sizes, digest, source, its padding, pixels, padding.
    for position in sorted({0, 7, 8, 15, 16, 63, 64, 72, 80, 88, 96, 104, 112, 120, 159, 160, start - 1, start,
                            len(sound) - 2, len(sound) - 1}):
        with open(entry, "wb") as file:
            file.write(sound[:position] + bytes([sound[position] ^ 0x10]) + sound[position + 1:])
        assert cache.entry_problem(entry) is not None, position
    with open(entry, "wb") as file:
        file.write(sound)
    assert cache.entry_problem(entry) is None


def test_entry_problem_of_a_missing_entry(cached):
    cache, _, (entry, _) = cached
    os.remove(entry)
    assert cache.entry_problem(entry) == "missing"


def test_sound_entries_hold_the_pixels_format_1_held(cached):
    cache, images, entries = cached
    for image, entry in zip(images, entries):
        old = tf.io.parse_tensor(old_format_entry(cache, image), tf.uint8).numpy()
        pixels = read_pixels(entry)
        assert pixels.dtype == np.float32 and pixels.shape == old.shape
        np.testing.assert_array_equal(pixels, old)


def test_entries_of_the_old_format_are_not_used(cached, monkeypatch):
    cache, images, entries = cached
    monkeypatch.setattr(cache_module, "_ENTRY_FORMAT", 1)
    old_entry = cache.entry_path(images[0])
    monkeypatch.undo()
    assert old_entry != entries[0]  # the format is part of the name
    os.makedirs(os.path.dirname(old_entry), exist_ok=True)
    with open(old_entry, "wb") as file:
        file.write(old_format_entry(cache, images[0]))
    assert ImageCache(cache.directory, SIDE).cached_paths(images, progress=False) == entries


def test_damaged_entry_of_reads_escaped_paths_back(tmp_path):
    rng = np.random.default_rng(1)
    image = write_image(str(tmp_path / "a.png"), rng)
    cache = ImageCache(str(tmp_path / "caché 'q' \\ \"d\""), SIDE)
    (entry,) = cache.cached_paths([image], progress=False)
    with open(entry, "wb") as file:
        file.write(b"garbage")
    with pytest.raises(tf.errors.InvalidArgumentError) as in_graph:
        list(pipeline.eval_dataset([entry], 8))
    with pytest.raises(tf.errors.InvalidArgumentError) as eager:
        pipeline.read_cached_image(entry)
    assert damaged_entry_of(in_graph.value) == entry
    assert damaged_entry_of(eager.value) == entry
    assert damaged_entry_of(str(in_graph.value)) == entry
    assert damaged_entry_of("NotFoundError: /x/ab/cd.tensor; No such file or directory") is None


def test_rebuild_reports_images_that_no_longer_decode_and_removes_their_entries(cached):
    cache, images, (entry, other) = cached
    with open(images[0], "wb") as file:
        file.write(b"\x89PNG not really")
    new_entry = cache.entry_path(images[0])  # the image changed, so its entry's name did too
    os.makedirs(os.path.dirname(new_entry), exist_ok=True)
    with open(new_entry, "wb") as file:  # e.g. a damaged entry found under the new name
        file.write(b"garbage")
    os.remove(images[1])
    assert cache.rebuild(images, progress=False) == [images[1], images[0]]
    assert not os.path.exists(new_entry)
    assert os.path.exists(entry) and os.path.exists(other)  # the old names: not theirs to remove


def test_a_deleted_cache_directory_is_rebuilt_by_the_next_call(cached):
    cache, images, entries = cached
    sound = [read_pixels(entry) for entry in entries]
    # Another cache of the same directory (training's and evaluation's share --cache_dir).
    other_side = ImageCache(cache.directory, SIDE // 2)
    other_entries = other_side.cached_paths(images, progress=False)
    shutil.rmtree(cache.directory)

    assert cache.cached_paths(images, progress=False) == entries
    for entry, pixels in zip(entries, sound):
        np.testing.assert_array_equal(read_pixels(entry), pixels)
    # The directory is there again, made by the first cache: the other one still knows its
    # entries went with the old one.
    assert other_side.check_and_build(images, progress=False).checked == 2
    assert all(cache.entry_problem(entry) is None for entry in other_entries)


def test_forget_finds_entries_removed_one_by_one(cached):
    cache, images, entries = cached
    os.remove(entries[1])
    assert cache.check_and_build(images, progress=False).checked == 0  # known to exist: not looked up
    cache.forget()
    assert cache.check_and_build(images, progress=False).checked == 1
    assert cache.entry_problem(entries[1]) is None
