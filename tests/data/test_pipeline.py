"""Class-balanced sampling and the tf.data pipelines."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from pnpp_tf.data import load_splits, pipeline


def imbalanced_labels():
    # Class 5 has a single image, fewer than a batch takes of each class.
    sizes = [9, 4, 7, 3, 12, 1, 6]
    return np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])


def test_every_batch_has_the_promised_class_structure():
    labels = imbalanced_labels()
    sampler = pipeline.ClassBalancedSampler(labels, batch_size=12, classes_per_batch=4, seed=3)
    assert sampler.num_batches == len(labels) // 12
    for epoch in range(20):
        batches = sampler.epoch_batches(epoch)
        assert batches.shape == (sampler.num_batches, 12)
        for batch in batches:
            counts = collections.Counter(labels[batch].tolist())
            assert len(counts) == 4 and set(counts.values()) == {3}
            for c in counts:
                # A class is drawn as one contiguous group of its images.
                assert list(labels[batch]).count(c) == 3


def test_images_of_a_class_cycle_before_repeating():
    labels = np.repeat(np.arange(2), 6)
    sampler = pipeline.ClassBalancedSampler(labels, batch_size=6, classes_per_batch=2, seed=0)
    seen = collections.Counter(sampler.epoch_batches(0).reshape(-1).tolist())
    # 2 batches x 3 images of each class = 6 draws per class, each of its 6 images exactly once.
    assert sorted(seen) == list(range(12)) and set(seen.values()) == {1}


def class_groups(sampler, labels, epochs):
    """Every class's groups of images over `epochs`, in batch order: {class: [group, ...]}."""
    groups = collections.defaultdict(list)
    for epoch in epochs:
        for batch in sampler.epoch_batches(epoch):
            for c in dict.fromkeys(labels[batch].tolist()):
                groups[c].append(batch[labels[batch] == c].tolist())
    return groups


def test_no_batch_repeats_an_image_of_a_class_with_enough_images():
    # 4 images a class per batch; classes of 4..9 images (the few-images regime of small benchmarks).
    sizes = [4, 5, 6, 7, 8, 9]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    sampler = pipeline.ClassBalancedSampler(labels, batch_size=8, classes_per_batch=2, seed=5)
    for c, groups in class_groups(sampler, labels, range(30)).items():
        for group in groups:
            assert len(set(group)) == 4, (c, group)
        # A pass through a class's queue holds len // 4 disjoint groups (the rest are left out),
        # and passes carry over from one epoch to the next, as in the authors' sampler.
        per_pass = sizes[c] // 4
        for start in range(0, len(groups) - per_pass + 1, per_pass):
            seen = [i for group in groups[start:start + per_pass] for i in group]
            assert len(set(seen)) == len(seen), (c, start, groups)


def test_any_epoch_is_regenerated_alike_in_any_order():
    labels = imbalanced_labels()
    in_order = pipeline.ClassBalancedSampler(labels, 8, 4, seed=1)
    expected = [in_order.epoch_batches(e) for e in range(6)]
    shuffled = pipeline.ClassBalancedSampler(labels, 8, 4, seed=1)
    for e in (5, 2, 3, 0, 4, 1, 5):
        np.testing.assert_array_equal(shuffled.epoch_batches(e), expected[e])


def test_small_classes_are_sampled_with_replacement():
    labels = np.array([0, 1, 1, 1, 1, 1])
    sampler = pipeline.ClassBalancedSampler(labels, batch_size=6, classes_per_batch=2, seed=0)
    batch = sampler.epoch_batches(0)[0]
    assert list(batch[labels[batch] == 0]) == [0, 0, 0]


def test_sampling_is_deterministic_per_seed_and_epoch():
    labels = imbalanced_labels()
    a = pipeline.ClassBalancedSampler(labels, 8, 4, seed=1)
    b = pipeline.ClassBalancedSampler(labels, 8, 4, seed=1)
    np.testing.assert_array_equal(a.epoch_batches(2), b.epoch_batches(2))
    assert not np.array_equal(a.epoch_batches(2), a.epoch_batches(3))
    assert not np.array_equal(a.epoch_batches(2), pipeline.ClassBalancedSampler(labels, 8, 4, seed=2).epoch_batches(2))


@pytest.mark.parametrize("batch_size, classes_per_batch, message", [
    (10, 4, "--batch_size=10 is not divisible by --classes_per_batch=4"),
    (16, 8, "--classes_per_batch=8 exceeds the 7 training classes"),
    (0, 4, "must be positive"),
])
def test_bad_batch_shapes_raise(batch_size, classes_per_batch, message):
    with pytest.raises(ValueError, match=message):
        pipeline.ClassBalancedSampler(imbalanced_labels(), batch_size, classes_per_batch)


def test_train_dataset_yields_sampler_batches_of_augmented_images(folder_dataset):
    train = load_splits("folder", folder_dataset)["train"]
    sampler = pipeline.ClassBalancedSampler(train.labels, batch_size=4, classes_per_batch=2, seed=0)
    dataset = pipeline.train_dataset(train.paths, train.labels, sampler, 24, epochs=2, seed=0)
    batches = list(dataset.as_numpy_iterator())
    assert len(batches) == 2 * sampler.num_batches
    expected = np.concatenate([sampler.epoch_batches(0), sampler.epoch_batches(1)])
    for (images, labels), indices in zip(batches, expected):
        assert images.shape == (4, 24, 24, 3) and images.dtype == np.float32
        assert 0.0 <= images.min() and images.max() <= 255.0
        np.testing.assert_array_equal(labels, train.labels[indices])
    again = list(pipeline.train_dataset(train.paths, train.labels, sampler, 24, epochs=2, seed=0).as_numpy_iterator())
    np.testing.assert_array_equal(batches[0][0], again[0][0])


def test_first_epoch_continues_the_sampler(folder_dataset):
    train = load_splits("folder", folder_dataset)["train"]
    sampler = pipeline.ClassBalancedSampler(train.labels, batch_size=4, classes_per_batch=2, seed=0)
    late = list(pipeline.train_dataset(train.paths, train.labels, sampler, 24, epochs=1, first_epoch=3).as_numpy_iterator())
    np.testing.assert_array_equal(late[0][1], train.labels[sampler.epoch_batches(3)[0]])


def test_eval_dataset_keeps_order_and_center_crops(folder_dataset):
    test = load_splits("folder", folder_dataset)["test"]
    images = np.concatenate(list(pipeline.eval_dataset(test.paths, 32, batch_size=5).as_numpy_iterator()))
    assert images.shape == (len(test.paths), 32, 32, 3)
    first = pipeline.decode_image(test.paths[0]).numpy()
    # The images are 40x36: shorter side 36 -> 36, so the crop is the central 32x32 of a 40x36 image.
    np.testing.assert_allclose(images[0], first[2:34, 4:36], atol=1e-3)


def test_greyscale_and_alpha_images_decode_to_rgb(folder_dataset):
    test = load_splits("folder", folder_dataset)["test"]
    for path in test.paths:
        assert pipeline.decode_image(path).shape[-1] == 3


def test_the_pipelines_refuse_an_image_over_max_pixels_undecoded(folder_dataset):
    splits = load_splits("folder", folder_dataset)
    test, train = splits["test"], splits["train"]  # 40 x 36 images: 1440 pixels each
    message = rf"{test.paths[0]} is 40x36 = 1440 pixels, more than max_pixels=1439"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        list(pipeline.eval_dataset(test.paths, 32, batch_size=5, max_pixels=1439))
    assert len(list(pipeline.eval_dataset(test.paths, 32, batch_size=5, max_pixels=1440))) == 3
    sampler = pipeline.RandomSampler(len(train), batch_size=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="is 40x36 = 1440 pixels, more than max_pixels=1439"):
        list(pipeline.train_dataset(train.paths, train.labels, sampler, 24, epochs=1, max_pixels=1439))


def test_eval_dataset_can_leave_out_unreadable_images_and_say_which(folder_dataset, tmp_path):
    test = load_splits("folder", folder_dataset)["test"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = [test.paths[0], str(broken), test.paths[1], str(tmp_path / "missing.png"), test.paths[2]]
    batches = list(pipeline.eval_dataset(paths, 32, batch_size=2, skip_unreadable=True).as_numpy_iterator())
    positions = np.concatenate([batch[0] for batch in batches])
    images = np.concatenate([batch[1] for batch in batches])
    np.testing.assert_array_equal(positions, [0, 2, 4])
    # Batches of two of the images that decode, not of two paths.
    assert [len(batch[0]) for batch in batches] == [2, 1]
    want = np.concatenate(list(pipeline.eval_dataset(test.paths[:3], 32, batch_size=3).as_numpy_iterator()))
    np.testing.assert_array_equal(images, want)
    # Over the pixel budget (40 x 36 = 1440 pixels) is left out too, rather than stopping.
    assert list(pipeline.eval_dataset(test.paths, 32, max_pixels=1439, skip_unreadable=True)) == []
