"""Leaving out images that stop reading mid-run: every batch keeps its classes."""

import numpy as np
import pytest

from pnpp_tf.data.faults import stand_ins
from pnpp_tf.data.split import Split
from pnpp_tf.errors import UserError


def naive_stand_ins(split, bad):
    """For each bad image, walk its class from the next image on, wrapping round."""
    read = []
    for index, path in enumerate(split.paths):
        if path not in bad:
            read.append(path)
            continue
        label = split.labels[index]
        n = len(split.paths)
        for step in range(1, n + 1):
            other = (index + step) % n
            if split.labels[other] == label and split.paths[other] not in bad:
                read.append(split.paths[other])
                break
    return read


def test_each_bad_image_reads_the_next_good_one_of_its_class():
    # Classes interleaved, so "next of its class" is not "next in the list".
    split = Split([f"{c}{i}" for i in range(4) for c in "ab"], np.array([0, 1] * 4), ["a", "b"])
    for bad in ({"a0"}, {"a3"}, {"a1", "a2"}, {"a3", "a0"}, {"b0", "a2", "b3"}, set()):
        read = stand_ins(split, bad)
        assert read == naive_stand_ins(split, bad), bad
        assert not set(read) & bad
        assert [path[0] for path in read] == [path[0] for path in split.paths]  # classes kept


def test_a_class_with_no_readable_image_left_is_named():
    split = Split(["a0", "a1", "b0"], np.array([0, 0, 1]), ["cats", "dogs"])
    with pytest.raises(UserError, match="Every training image of class cats has stopped reading"):
        stand_ins(split, {"a0", "a1"})
