"""Splits check their labels when built: the compiled train step cannot."""

import numpy as np
import pytest

from pnpp_tf.data.split import Split, class_halves, split_from_groups
from pnpp_tf.errors import UserError


def test_built_splits_and_their_halves_pass_the_check():
    split = split_from_groups({f"c{k}": [f"c{k}/{i}.jpg" for i in range(2)] for k in range(4)})
    train_half, val_half = class_halves(split)
    assert list(split.labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert list(val_half.labels) == [0, 0, 1, 1] and val_half.class_names == ["c2", "c3"]
    assert len(train_half) == 4
    # A shared label space may name classes that have no image in this split.
    assert split_from_groups({"b": ["b.jpg"]}, ["a", "b", "c"]).labels.tolist() == [1]


@pytest.mark.parametrize("labels, message", [
    ([0, 2], r"in \[0, 2\).* got 2;"),
    ([-1, 0], r"got -1;"),
    ([0, 1, 1], r"2 image paths but labels of shape \(3,\)"),
    ([0.0, 1.0], "integers"),
    ([[0], [1]], "one label per path"),
])
def test_bad_labels_raise_a_one_line_user_error(labels, message):
    with pytest.raises(UserError, match=message) as raised:
        Split(["a.jpg", "b.jpg"], np.asarray(labels), ["a", "b"])
    assert "\n" not in str(raised.value)


def test_many_bad_labels_are_shown_five_at_most():
    with pytest.raises(UserError, match=r"got 5, 6, 7, 8, 9 \.\.\.;"):
        Split([f"{i}.jpg" for i in range(11)], np.arange(11), ["a"] * 5)
