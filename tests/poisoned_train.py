"""`python -m pnpp_tf.train` whose training images all decode to NaN: a poisoned input pipeline.

Run by test_resume.py to check that a numerical fault stops training cleanly.
"""

import tensorflow as tf

from pnpp_tf.data import pipeline

_decode = pipeline.decode_image


def _poisoned_decode(path, *args, **kwargs):
    image = _decode(path, *args, **kwargs)
    is_training_image = tf.strings.regex_full_match(path, ".*/train/.*")
    return tf.where(is_training_image, tf.fill(tf.shape(image), float("nan")), image)


if __name__ == "__main__":
    pipeline.decode_image = _poisoned_decode
    from pnpp_tf import flags, train  # pylint: disable=import-outside-toplevel
    from pnpp_tf.config import TrainConfig  # pylint: disable=import-outside-toplevel

    flags.run(train.main, TrainConfig, "pnpp_tf.train")
