"""The Trainer's plan of fits (a resumed epoch is finished on its own, then whole epochs follow)
and how often it measures."""

from pnpp_tf.training.trainer import EVAL_TIME_SHARE, FORWARD_PASSES_PER_TRAIN_IMAGE, Segment, eval_interval, segments


def test_a_fresh_phase_is_one_fit():
    assert segments(1, 0, 5) == [Segment(1, 0, 5)]


def test_a_mid_epoch_resume_finishes_that_epoch_first():
    assert segments(2, 3, 5) == [Segment(2, 3, 3), Segment(3, 0, 5)]


def test_a_resume_in_the_last_epoch_is_one_short_fit():
    assert segments(4, 3, 5) == [Segment(4, 3, 5)]


def test_eval_every_auto_keeps_measuring_within_a_tenth_of_the_training_time():
    # CUB and SOP (trainval): about as many test images as training images: every 4th epoch.
    assert eval_interval("auto", train_images=5856, eval_images=5924) == 4
    assert eval_interval("auto", train_images=59520, eval_images=60502) == 4
    # A test split far smaller than the training split is measured after every epoch.
    assert eval_interval("auto", train_images=100_000, eval_images=1_000) == 1
    for train_images, eval_images in ((5856, 5924), (1302, 1619), (1000, 30_000)):
        every = eval_interval("auto", train_images, eval_images)
        share = lambda n: eval_images / (FORWARD_PASSES_PER_TRAIN_IMAGE * train_images * n + eval_images)
        assert share(every) <= EVAL_TIME_SHARE < share(every - 1) or every == 1


def test_an_explicit_eval_every_is_taken_as_given():
    assert eval_interval("3", 10, 10_000) == 3
    assert eval_interval("0", 10, 10) == 0
