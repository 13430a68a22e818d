"""The training crop is torchvision's RandomResizedCrop: checked against a plain transcription of
`RandomResizedCrop.get_params`, fed the same uniform draws, and (where torchvision is installed)
against torchvision's own crops in distribution."""

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from pnpp_tf.data import pipeline

# Square, landscape, portrait, and two so elongated that most attempts fail and the central
# fallback (with the aspect ratio clipped to 4/3 or 3/4) decides.
SHAPES = [(64, 64), (40, 100), (97, 31), (300, 20), (12, 500)]


def get_params(height, width, draws, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision 0.29's RandomResizedCrop.get_params, line for line, its random numbers taken
    from `draws` (a row per attempt: area, log ratio, top, left, each uniform in [0, 1))."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for u in draws:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(u[2] * (height - h + 1))  # torch.randint(0, height - h + 1)
            j = int(u[3] * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width", SHAPES)
def test_the_window_is_torchvisions_for_the_same_draws(height, width):
    rng = np.random.default_rng(height * 1000 + width)
    window = tf.function(pipeline.crop_window)
    for _ in range(300):
        draws = rng.random((pipeline.CROP_ATTEMPTS, 4))
        expected = get_params(height, width, draws)
        got = tuple(int(v) for v in window(tf.constant(height), tf.constant(width), tf.constant(draws)))
        assert got == expected, (draws, got, expected)


def test_an_image_too_elongated_for_any_window_gets_the_central_crop():
    # 8% of 12 x 500 is 480 pixels: at aspect ratio 4/3 at most, a window is 19 high, more than 12.
    draws = tf.random.stateless_uniform([pipeline.CROP_ATTEMPTS, 4], [1, 2], dtype=tf.float64)
    top, left, height, width = (int(v) for v in pipeline.crop_window(12, 500, draws))
    assert (top, left, height, width) == (0, (500 - 16) // 2, 12, 16)


def test_the_crop_resizes_the_window_its_seed_draws():
    image = tf.reshape(tf.range(40 * 30 * 3, dtype=tf.float32), [40, 30, 3])
    seed = tf.constant([7, 11], tf.int64)
    draws = tf.random.stateless_uniform([pipeline.CROP_ATTEMPTS, 4], seed, dtype=tf.float64)
    i, j, h, w = get_params(40, 30, draws.numpy())
    expected = tf.image.resize(image[i:i + h, j:j + w], [16, 16], method="bilinear", antialias=True)
    np.testing.assert_array_equal(pipeline.random_resized_crop(image, 16, seed), expected)


def crop_fractions(windows, height, width):
    windows = np.asarray(windows, dtype=np.float64)
    return windows[:, 2] * windows[:, 3] / (height * width), windows[:, 3] / windows[:, 2]


TORCHVISION_WINDOWS = """
import json, sys, torch, torchvision
height, width, n = (int(v) for v in sys.argv[1:])
torch.manual_seed(0)
image = torch.zeros(3, height, width)
print(json.dumps([torchvision.transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                  for _ in range(n)]))
"""


@pytest.mark.parametrize("height,width", [(64, 64), (40, 100)])
def test_crops_are_distributed_as_torchvisions(height, width):
    if importlib.util.find_spec("torchvision") is None:  # not imported here: see below
        pytest.skip("torchvision is not installed")
    n = 4000
    # Its own process: torch imported beside TensorFlow can crash (tools/torch_process.py).
    result = subprocess.run([sys.executable, "-c", TORCHVISION_WINDOWS, str(height), str(width), str(n)],
                            capture_output=True, text=True, check=True)
    theirs = json.loads(result.stdout)
    window = tf.function(lambda seed: pipeline.crop_window(
        height, width, tf.random.stateless_uniform([pipeline.CROP_ATTEMPTS, 4], seed, dtype=tf.float64)))
    ours = [[int(v) for v in window(tf.constant([0, k], tf.int64))] for k in range(n)]
    for mine, their in zip(crop_fractions(ours, height, width), crop_fractions(theirs, height, width)):
        # Means of n independent draws each: 5 standard errors of the difference.
        tolerance = 5 * math.sqrt((mine.var() + their.var()) / n)
        assert abs(mine.mean() - their.mean()) < tolerance, (mine.mean(), their.mean(), tolerance)
