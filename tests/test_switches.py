"""Each ProxyNCA++ component switch changes exactly what it names (the paper's ablation)."""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from pnpp_tf.data import pipeline
from pnpp_tf.modeling.losses import ProxyNCALoss
from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder
from pnpp_tf.modeling.optimizers import TorchAdam


def features_and_pooled(embedder, images):
    """(last feature map, the vector entering the embedding layer) for `images`."""
    pool = next(layer for layer in embedder.layers if layer.name.startswith("global_"))
    probe = keras.Model(embedder.input, [pool.input, embedder.get_layer("embedding").input])
    return [t.numpy() for t in probe(images, training=False)]


@pytest.fixture
def images():
    return np.random.default_rng(0).uniform(0, 255, size=(3, 32, 32, 3)).astype(np.float32)


def test_pooling_avg_is_the_mean_and_max_the_maximum(images):
    for pooling, reduce in (("avg", np.mean), ("max", np.max)):
        embedder = build_embedder("small_cnn", 32, 8, pooling=pooling, layer_norm=False)
        feature_map, pooled = features_and_pooled(embedder, images)
        np.testing.assert_allclose(pooled, reduce(feature_map, axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_layer_norm_standardises_the_pooled_vector_without_affine_parameters(images):
    embedder = build_embedder("small_cnn", 32, 8, pooling="max", layer_norm=True)
    feature_map, normalised = features_and_pooled(embedder, images)
    pooled = feature_map.max(axis=(1, 2))
    expected = (pooled - pooled.mean(1, keepdims=True)) / np.sqrt(pooled.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(normalised, expected, rtol=1e-4, atol=1e-4)
    assert not embedder.get_layer("layer_norm").weights


def test_temperature_scales_the_logits():
    embeddings = tf.random.normal([4, 6], seed=1)
    labels = np.array([0, 1, 2, 0])
    warm = ProxyNCALoss(3, 6, temperature=1.0)
    cold = ProxyNCALoss(3, 6, temperature=1.0 / 9.0)
    cold.proxies.assign(warm.proxies)
    x = tf.math.l2_normalize(embeddings, 1)
    p = tf.math.l2_normalize(warm.proxies, 1)
    logits = -tf.reduce_sum(tf.square(x[:, None] - p[None]), -1)
    for layer, scale in ((warm, 1.0), (cold, 9.0)):
        expected = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scale * logits))
        np.testing.assert_allclose(layer(embeddings, labels).numpy(), expected.numpy(), rtol=1e-5)


def test_fast_proxies_off_gives_the_proxies_the_backbones_step(images):
    labels = np.array([0, 1, 1], dtype=np.int32)
    lr = 0.01
    embedder = build_embedder("small_cnn", 32, 8)
    model = ProxyNCAModel(embedder, 2)
    model.compile(optimizer=TorchAdam(lr), proxy_optimizer=TorchAdam(lr))
    variables = [model.loss_layer.proxies, embedder.get_layer("embedding").kernel]
    with tf.GradientTape() as tape:
        loss = model.loss_layer(embedder(images, training=True), labels)
    gradients = [g.numpy() for g in tape.gradient(loss, variables)]
    before = [v.numpy().copy() for v in variables]
    model.train_on_batch(images, labels)
    # The first Adam step of both is lr * g / (|g| + 1): the same rule, the same rate.
    for variable, start, gradient in zip(variables, before, gradients):
        step = variable.numpy() - start
        expected = -lr * gradient / (np.abs(gradient) + 1.0)
        np.testing.assert_allclose(step, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_random_sampler_ignores_classes_but_covers_every_image():
    labels = np.repeat(np.arange(10), 5)
    sampler = pipeline.make_sampler("random", labels, batch_size=10, classes_per_batch=999, seed=0)
    batches = sampler.epoch_batches(0)
    assert batches.shape == (5, 10)
    assert sorted(batches.reshape(-1)) == list(range(50))
    class_counts = [len(collections.Counter(labels[b])) for b in batches]
    assert max(class_counts) > 5  # not 2 classes x 5 images, as a balanced sampler would give
    assert not np.array_equal(batches, sampler.epoch_batches(1))


def test_unknown_sampler_raises():
    with pytest.raises(ValueError, match="--sampler"):
        pipeline.make_sampler("stratified", np.zeros(4), 2, 1)
