"""The on-disk image cache: what it stores, that the pipelines read it alike, and its upkeep."""

import os

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from pnpp_tf.data import load_splits, pipeline
from pnpp_tf.data.cache import ImageCache, default_short_side


def entries_in(directory):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(directory) for name in names)


def test_entries_hold_the_downsized_pixels(tmp_path):
    # A smooth ramp, which any sound downsizing maps to the means of pixel blocks.
    rows, columns = np.mgrid[0:80, 0:120]
    ramp = np.stack([rows * 3, columns * 2, rows + columns], axis=-1).astype(np.uint8)
    big = str(tmp_path / "big.png")
    Image.fromarray(ramp).save(big)
    small = write_image(str(tmp_path / "small.png"), np.random.default_rng(0), size=(30, 20))
    cache = ImageCache(str(tmp_path / "cache"), short_side=40)
    big_entry, small_entry = cache.cached_paths([big, small], progress=False)

    downsized = pipeline.read_cached_image(big_entry).numpy()
    assert downsized.shape == (40, 60, 3)  # shorter side 80 -> 40, aspect kept
    original = pipeline.decode_image(big).numpy()
    blocks = original.reshape(40, 2, 60, 2, 3).mean(axis=(1, 3))
    inner = (slice(1, -1), slice(1, -1))  # the filter's support is clipped at the borders
    assert np.abs(downsized[inner] - blocks[inner]).max() <= 0.5 + 1e-3
    # An image already smaller than the cache's side is kept exactly, never enlarged.
    np.testing.assert_array_equal(pipeline.read_cached_image(small_entry).numpy(),
                                  pipeline.decode_image(small).numpy())


def test_cached_evaluation_matches_uncached_up_to_rounding(folder_dataset, tmp_path):
    test = load_splits("folder", folder_dataset)["test"]
    size = 24
    cached = ImageCache(str(tmp_path / "cache"), default_short_side(size)).cached_split(test, progress=False)
    assert list(cached.labels) == list(test.labels) and cached.class_names == test.class_names

    plain = np.concatenate(list(pipeline.eval_dataset(test.paths, size).as_numpy_iterator()))
    from_cache = np.concatenate(list(pipeline.eval_dataset(cached.paths, size).as_numpy_iterator()))
    assert plain.shape == from_cache.shape
    # Evaluation resizes to the cache's side exactly, so only the rounding to uint8 differs.
    assert np.abs(plain - from_cache).max() <= 0.5 + 1e-3


def test_training_batches_from_the_cache(folder_dataset, tmp_path):
    train = load_splits("folder", folder_dataset)["train"]
    cached = ImageCache(str(tmp_path / "cache"), short_side=64).cached_split(train, progress=False)
    sampler = pipeline.ClassBalancedSampler(train.labels, 8, 2, seed=0)
    plain = list(pipeline.train_dataset(train.paths, train.labels, sampler, 24, epochs=1).as_numpy_iterator())
    from_cache = list(pipeline.train_dataset(cached.paths, cached.labels, sampler, 24, epochs=1).as_numpy_iterator())
    # The test images are smaller than the cache's side, so the cache holds their exact pixels
    # and the same crops come out.
    for (images, labels), (cached_images, cached_labels) in zip(plain, from_cache):
        np.testing.assert_array_equal(labels, cached_labels)
        np.testing.assert_allclose(images, cached_images, atol=1e-4)


def test_a_second_use_reuses_the_entries_and_an_edited_image_gets_a_new_one(tmp_path):
    rng = np.random.default_rng(1)
    paths = [write_image(str(tmp_path / "images" / f"{i}.png"), rng) for i in range(3)]
    cache = ImageCache(str(tmp_path / "cache"), short_side=16)
    first = cache.cached_paths(paths, progress=False)
    stamps = [os.stat(entry).st_mtime_ns for entry in first]
    assert cache.cached_paths(paths, progress=False) == first
    assert [os.stat(entry).st_mtime_ns for entry in first] == stamps  # not rewritten

    write_image(paths[1], rng, size=(50, 30))
    os.utime(paths[1], ns=(1, 1))  # another modification time, whatever the clock's resolution
    again = cache.cached_paths(paths, progress=False)
    assert again[0] == first[0] and again[2] == first[2] and again[1] != first[1]
    assert pipeline.read_cached_image(again[1]).shape == (16, 27, 3)
    # Another side is another entry, beside the first.
    other = ImageCache(str(tmp_path / "cache"), short_side=8).cached_paths(paths[:1], progress=False)
    assert other != first[:1] and len(entries_in(tmp_path / "cache")) == 5


def test_an_interrupted_build_leaves_only_whole_entries_and_no_temporaries(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    paths = [write_image(str(tmp_path / "images" / f"{i}.png"), rng) for i in range(4)]
    cache = ImageCache(str(tmp_path / "cache"), short_side=16)
    real_rename = pipeline.tf.io.gfile.rename
    renamed = []

    def rename_then_die(source, target, overwrite=False):
        if len(renamed) == 2:
            raise KeyboardInterrupt
        renamed.append(target)
        real_rename(source, target, overwrite=overwrite)

    monkeypatch.setattr(pipeline.tf.io.gfile, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        cache.cached_paths(paths, progress=False)
    monkeypatch.undo()
    left = entries_in(tmp_path / "cache")
    assert all(entry.endswith(pipeline.CACHED_IMAGE_SUFFIX) for entry in left)  # no temporary
    assert left == sorted(renamed)
    entries = cache.cached_paths(paths, progress=False)
    assert all(pipeline.read_cached_image(entry).shape == (16, 18, 3) for entry in entries)


def test_an_image_that_does_not_decode_is_named(tmp_path):
    rng = np.random.default_rng(3)
    good = write_image(str(tmp_path / "good.png"), rng)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: cannot read or decode this image for the cache"):
        ImageCache(str(tmp_path / "cache"), 16).cached_paths([good, str(broken)], progress=False)


def test_a_listed_image_that_is_gone_is_a_bad_image(tmp_path):
    good = write_image(str(tmp_path / "good.png"), np.random.default_rng(3))
    gone = str(tmp_path / "gone.png")  # a list-file dataset (SOP, In-Shop) may name a deleted file
    cache = ImageCache(str(tmp_path / "cache"), 16)
    check = cache.check_and_build([good, gone], progress=False)
    assert check.bad == [(gone, "file not found")] and check.checked == 2
    with pytest.raises(ValueError, match="gone.png: cannot read or decode this image for the cache .file not found"):
        cache.cached_paths([good, gone], progress=False)


def test_the_start_up_check_with_a_cache_decodes_each_image_once(tmp_path):
    rng = np.random.default_rng(4)
    good = [write_image(str(tmp_path / f"good_{i}.png"), rng) for i in range(3)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    cache = ImageCache(str(tmp_path / "cache"), 16)

    first = cache.check_and_build([good[0], str(broken), *good[1:]], progress=False)
    assert first.checked == 4 and [path for path, _ in first.bad] == [str(broken)]
    assert first.bad[0][1]  # the decoder's reason
    assert len(entries_in(tmp_path / "cache")) == 3  # the good ones, already cached
    again = cache.check_and_build(good, progress=False)
    assert again.checked == 0 and not again.bad  # cached images are known to decode


def test_a_dataset_reads_from_the_cache_entirely_or_not_at_all(folder_dataset, tmp_path):
    test = load_splits("folder", folder_dataset)["test"]
    entries = ImageCache(str(tmp_path / "cache"), 16).cached_paths(test.paths[:2], progress=False)
    with pytest.raises(ValueError, match="2 of 4 paths are image cache entries"):
        pipeline.eval_dataset(entries + test.paths[2:4], 16)


@pytest.mark.parametrize("directory, side, message", [
    ("", 16, "needs a directory"),
    ("somewhere", 0, "--cache_short_side must be a positive number of pixels, got 0"),
])
def test_bad_settings_are_refused(directory, side, message):
    with pytest.raises(ValueError, match=message):
        ImageCache(directory, side)


def test_an_image_over_max_pixels_gets_no_entry(tmp_path):
    rng = np.random.default_rng(5)
    small = write_image(str(tmp_path / "small.png"), rng, size=(20, 10))
    large = write_image(str(tmp_path / "large.png"), rng, size=(40, 30))
    cache = ImageCache(str(tmp_path / "cache"), 16)
    result = cache.check_and_build([small, large], progress=False, max_pixels=1199)
    assert result.too_large == [large] and result.bad == [(large, "40x30 = 1200 pixels, more than max_pixels=1199")]
    assert len(entries_in(tmp_path / "cache")) == 1  # the small one's
    with pytest.raises(ValueError, match="large.png: cannot read or decode this image for the cache "
                                         r"\(40x30 = 1200 pixels, more than max_pixels=1199\)"):
        cache.cached_paths([small, large], progress=False, max_pixels=1199)
    assert len(cache.cached_paths([small, large], progress=False, max_pixels=1200)) == 2
    assert len(entries_in(tmp_path / "cache")) == 2
