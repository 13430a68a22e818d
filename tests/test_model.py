"""The embedder and ProxyNCAModel's two-optimiser train step."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from pnpp_tf.errors import UserError
from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder, resolve_jit_compile
from pnpp_tf.modeling.optimizers import TorchAdam

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


def test_jit_compile_flag_values_map_to_what_keras_compile_takes():
    assert resolve_jit_compile("auto") == "auto"
    assert resolve_jit_compile("true") is True and resolve_jit_compile("FALSE") is False
    assert resolve_jit_compile(False, num_replicas=4) is False
    with pytest.raises(UserError, match="jit_compile"):
        resolve_jit_compile("maybe")


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="the CPU-only refusal")
def test_xla_with_several_cpu_replicas_is_refused_but_auto_is_not():
    with pytest.raises(UserError, match="multi-replica"):
        resolve_jit_compile("true", num_replicas=2)
    assert resolve_jit_compile("auto", num_replicas=2) == "auto"


def with_a_listed_gpu(monkeypatch):
    """Makes TensorFlow list one (fake) GPU, as Keras' "auto" sees it on a GPU machine."""
    real = tf.config.list_physical_devices
    gpu = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda device_type=None: real(device_type) + ([gpu] if device_type in (None, "GPU") else []))


@pytest.mark.parametrize("gpu, strategy, expected", [
    (False, None, False),  # XLA made the CPU train step slower (tools/bench_train.py)
    (False, "mirrored", False),
    (True, None, True),  # the one case --jit_compile=auto means XLA
    (True, "mirrored", False),  # Keras leaves XLA off under any tf.distribute strategy
])
def test_keras_auto_jit_compile_is_xla_only_on_a_gpu_without_a_strategy(monkeypatch, gpu, strategy, expected):
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("needs a CPU-only machine to fake its GPU")
    if gpu:
        with_a_listed_gpu(monkeypatch)
    scope = tf.distribute.MirroredStrategy(["/cpu:0"]).scope() if strategy else contextlib.nullcontext()
    with scope:
        model = tiny_model()
        model.compile(optimizer=TorchAdam(0.1), proxy_optimizer=TorchAdam(0.1), jit_compile=resolve_jit_compile("auto"))
    assert model.jit_compile is expected


def test_config_round_trip_rebuilds_the_same_model():
    images, _ = tiny_batch()
    model = ProxyNCAModel(tiny_model().embedder, NUM_CLASSES, temperature=0.5, loss_variant="proxynca")
    config = model.get_config()
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert isinstance(clone, ProxyNCAModel) and clone.embedder is not model.embedder
    assert (clone.loss_layer.num_classes, clone.loss_layer.temperature, clone.loss_layer.variant) == (
        NUM_CLASSES, 0.5, "proxynca")
    assert [l.name for l in clone.embedder.layers] == [l.name for l in model.embedder.layers]
    clone.set_weights(model.get_weights())  # raises unless every weight has its shape
    np.testing.assert_allclose(clone(images).numpy(), model(images).numpy(), rtol=1e-6, atol=1e-6)
    twice = [ProxyNCAModel.from_config(config) for _ in range(2)]  # the config is not used up
    assert [m.loss_layer.variant for m in twice] == ["proxynca", "proxynca"]


def counting_dataset(starts, batches=2):
    """A dataset of tiny batches that appends to `starts` each time it is iterated from the top."""
    def generate():
        starts.append(1)
        for _ in range(batches):
            yield tiny_batch()

    spec = (tf.TensorSpec((8, 32, 32, 3), tf.float32), tf.TensorSpec((8,), tf.int32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=spec)
    return dataset.apply(tf.data.experimental.assert_cardinality(batches))


def test_fit_under_a_strategy_does_not_peek_at_a_batch_to_build_the_built_model(monkeypatch):
    # Keras' peek all-reduces the batch, which fails under MultiWorkerMirroredStrategy; the
    # override of the private hook skips it. If this fails after a Keras upgrade, find where
    # fit() now builds the model, update ProxyNCAModel and the keras pin in setup.py.
    calls = []
    override = ProxyNCAModel._maybe_symbolic_build
    monkeypatch.setattr(ProxyNCAModel, "_maybe_symbolic_build",
                        lambda self, **kwargs: calls.append(kwargs) or override(self, **kwargs))
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        model = tiny_model()
        model.compile(optimizer=TorchAdam(0.0), proxy_optimizer=TorchAdam(0.0))
    starts = []
    model.fit(counting_dataset(starts), epochs=1, shuffle=False, verbose=0)
    assert calls, (f"Keras {keras.__version__} no longer calls Model._maybe_symbolic_build from fit(): "
                   "ProxyNCAModel's override is dead code")
    assert len(starts) == 1, f"fit() read the dataset {len(starts)} times: Keras peeked at a batch"


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
    from pnpp_tf.modeling.model import _clip_global_gradients  # pylint: disable=import-outside-toplevel

    gradient = tf.constant([np.inf, -np.inf, np.nan, 50.0, -3.0], tf.float16)
    kept = _clip_global_gradients([gradient], 10.0, replicas=1, keep_non_finite=True)[0].numpy()
    np.testing.assert_array_equal(kept, np.array([np.inf, -np.inf, np.nan, 10.0, -3.0], np.float16))
    plain = _clip_global_gradients([gradient], 10.0, replicas=1)[0].numpy()
    np.testing.assert_array_equal(plain[[0, 1, 3, 4]], np.array([10.0, -10.0, 10.0, -3.0], np.float16))
