"""The embedder and ProxyNCAModel's two-optimiser train step."""

import numpy as np
import pytest
import tensorflow as tf

from pnpp_tf.model import ProxyNCAModel, build_embedder, resolve_jit_compile
from pnpp_tf.optimizers import TorchAdam

NUM_CLASSES = 4


def tiny_model(embedding_dim=8, **kwargs):
    tf.keras.utils.set_random_seed(0)
    embedder = build_embedder("small_cnn", image_size=32, embedding_dim=embedding_dim, **kwargs)
    return ProxyNCAModel(embedder, NUM_CLASSES)


def tiny_batch():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(8, 32, 32, 3)).astype(np.float32)
    labels = np.repeat(np.arange(NUM_CLASSES), 2).astype(np.int32)
    return images, labels


def backbone_kernels(model):
    return [w.numpy().copy() for w in model.embedder.get_layer("backbone").weights if "kernel" in w.path]


def test_embedder_structure_follows_the_recipe():
    embedder = build_embedder("small_cnn", image_size=32, embedding_dim=16)
    layer_norm = embedder.get_layer("layer_norm")
    assert (layer_norm.center, layer_norm.scale, layer_norm.epsilon) == (False, False, 1e-5)
    assert embedder.get_layer("global_max_pool") is not None
    assert embedder.output.shape == (None, 16)
    bn_momenta = {l.momentum for l in embedder.get_layer("backbone").layers if "bn" in l.name}
    assert bn_momenta == {0.9}
    kernel = embedder.get_layer("embedding").kernel.numpy()
    assert np.abs(kernel).max() <= 1 / np.sqrt(256) and kernel.std() > 0.5 / np.sqrt(3 * 256)


def test_resnet50_has_pytorch_batchnorm_momentum():
    embedder = build_embedder("resnet50", image_size=32, embedding_dim=8, weights="none")
    momenta = {l.momentum for l in embedder.get_layer("backbone").layers if "bn" in l.name}
    assert momenta == {0.9}
    assert embedder.get_layer("embedding").kernel.shape == (2048, 8)


def test_calling_the_model_returns_unit_embeddings():
    model = tiny_model()
    images, _ = tiny_batch()
    norms = np.linalg.norm(model(images).numpy(), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_proxies_move_only_by_the_proxy_optimiser_at_its_learning_rate():
    images, labels = tiny_batch()
    model = tiny_model()
    proxy_lr = 0.5
    model.compile(optimizer=TorchAdam(0.0), proxy_optimizer=TorchAdam(proxy_lr))
    proxies_before = model.loss_layer.proxies.numpy().copy()
    embedder_before = [w.numpy().copy() for w in model.embedder.trainable_weights]
    # The gradient the train step will see: same weights, same batch, BatchNorm in training mode.
    with tf.GradientTape() as tape:
        loss = model.loss_layer(model.embedder(images, training=True), labels)
    gradient = tape.gradient(loss, model.loss_layer.proxies).numpy()

    model.train_on_batch(images, labels)

    # PyTorch Adam's first step is lr * g / (|g| + eps), eps = 1.
    expected_step = -proxy_lr * gradient / (np.abs(gradient) + 1.0)
    step = model.loss_layer.proxies.numpy() - proxies_before
    np.testing.assert_allclose(step, expected_step, rtol=1e-4, atol=1e-4 * np.abs(expected_step).max())
    assert np.abs(gradient).max() > 0
    for before, after in zip(embedder_before, model.embedder.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_main_optimiser_never_touches_the_proxies():
    images, labels = tiny_batch()
    model = tiny_model()
    model.compile(optimizer=TorchAdam(1.0), proxy_optimizer=TorchAdam(0.0))
    proxies_before = model.loss_layer.proxies.numpy().copy()
    kernels_before = backbone_kernels(model)
    model.train_on_batch(images, labels)
    np.testing.assert_array_equal(model.loss_layer.proxies.numpy(), proxies_before)
    assert any(not np.array_equal(a, b) for a, b in zip(kernels_before, backbone_kernels(model)))


def test_warmup_freezes_backbone_weights_but_batchnorm_statistics_move():
    images, labels = tiny_batch()
    model = tiny_model()
    model.compile(optimizer=TorchAdam(1.0), proxy_optimizer=TorchAdam(1.0), freeze_backbone=True)
    backbone = model.embedder.get_layer("backbone")
    trainable_before = [w.numpy().copy() for w in backbone.trainable_weights]
    moving_before = [w.numpy().copy() for w in backbone.non_trainable_weights]
    head_before = model.embedder.get_layer("embedding").kernel.numpy().copy()

    model.train_on_batch(images, labels)

    for before, after in zip(trainable_before, backbone.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())
    assert moving_before and all(
        not np.array_equal(before, after.numpy())
        for before, after in zip(moving_before, backbone.non_trainable_weights)
    )
    assert not np.array_equal(head_before, model.embedder.get_layer("embedding").kernel.numpy())


def test_recompiling_after_warmup_starts_a_fresh_optimiser_over_all_weights():
    images, labels = tiny_batch()
    model = tiny_model()
    model.compile(optimizer=TorchAdam(1e-3), proxy_optimizer=TorchAdam(1.0), freeze_backbone=True)
    model.train_on_batch(images, labels)
    main = TorchAdam(1e-3)
    model.compile(optimizer=main, proxy_optimizer=TorchAdam(1.0))
    assert int(main.iterations.numpy()) == 0
    assert len(model.main_variables) == len(model.embedder.trainable_variables)
    kernels_before = backbone_kernels(model)
    model.train_on_batch(images, labels)
    assert int(main.iterations.numpy()) == 1
    assert any(not np.array_equal(a, b) for a, b in zip(kernels_before, backbone_kernels(model)))


def test_average_pooling_and_no_layer_norm_options():
    embedder = build_embedder("small_cnn", image_size=32, embedding_dim=8, pooling="avg", layer_norm=False)
    names = [layer.name for layer in embedder.layers]
    assert "global_avg_pool" in names and "layer_norm" not in names


@pytest.mark.parametrize("kwargs, message", [
    ({"pooling": "sum"}, "pooling"),
    ({"backbone": "vgg"}, "Unknown backbone"),
    ({"weights": "/no/such/file.h5"}, "--weights"),
])
def test_bad_embedder_arguments_raise(kwargs, message):
    arguments = {"backbone": "small_cnn", "image_size": 32, "embedding_dim": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_embedder(**arguments)


def test_jit_compile_auto_is_off_without_a_gpu():
    assert resolve_jit_compile("auto") == bool(tf.config.list_physical_devices("GPU"))
    assert resolve_jit_compile("true") is True and resolve_jit_compile("false") is False
    with pytest.raises(ValueError, match="jit_compile"):
        resolve_jit_compile("maybe")


def test_clip_value_clips_backbone_and_embedding_gradients_but_not_the_proxies():
    images, labels = tiny_batch()
    model = tiny_model()
    # A huge learning rate on tiny clipping: each first Adam step is lr * c / (c + 1) at most.
    model.compile(optimizer=TorchAdam(1.0), proxy_optimizer=TorchAdam(1.0), clip_value=1e-3)
    weights_before = [w.numpy().copy() for w in model.main_variables]
    proxies_before = model.loss_layer.proxies.numpy().copy()
    model.train_on_batch(images, labels)
    bound = 1e-3 / (1e-3 + 1.0) + 1e-7
    for before, variable in zip(weights_before, model.main_variables):
        assert np.abs(variable.numpy() - before).max() <= bound
    assert np.abs(model.loss_layer.proxies.numpy() - proxies_before).max() > 10 * bound
    with pytest.raises(ValueError, match="clip_value"):
        model.compile(optimizer=TorchAdam(1.0), proxy_optimizer=TorchAdam(1.0), clip_value=-1)


def test_clipping_under_loss_scaling_lets_an_overflow_through_to_the_finite_check():
    from pnpp_tf.model import _clip_global_gradients  # pylint: disable=import-outside-toplevel

    gradient = tf.constant([np.inf, -np.inf, np.nan, 50.0, -3.0], tf.float16)
    kept = _clip_global_gradients([gradient], 10.0, replicas=1, keep_non_finite=True)[0].numpy()
    np.testing.assert_array_equal(kept, np.array([np.inf, -np.inf, np.nan, 10.0, -3.0], np.float16))
    plain = _clip_global_gradients([gradient], 10.0, replicas=1)[0].numpy()
    np.testing.assert_array_equal(plain[[0, 1, 3, 4]], np.array([10.0, -10.0, 10.0, -3.0], np.float16))
