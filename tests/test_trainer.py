"""The Trainer's plan of fits: a resumed epoch is finished on its own, then whole epochs follow."""

from pnpp_tf.trainer import Segment, segments


def test_a_fresh_phase_is_one_fit():
    assert segments(1, 0, 5) == [Segment(1, 0, 5)]


def test_a_mid_epoch_resume_finishes_that_epoch_first():
    assert segments(2, 3, 5) == [Segment(2, 3, 3), Segment(3, 0, 5)]


def test_a_resume_in_the_last_epoch_is_one_short_fit():
    assert segments(4, 3, 5) == [Segment(4, 3, 5)]
