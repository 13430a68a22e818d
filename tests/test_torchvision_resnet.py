"""The torchvision-exact ResNet-50 backbone and its state-dict converter.

The PyTorch tests build a ResNet-50 v1.5 from plain `torch.nn` modules (torchvision is not a
dependency), with the same module names as torchvision so its state dict has torchvision's keys,
and check that the converted Keras trunk computes the same feature map.
"""

import importlib.util
import pathlib
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from cli_helpers import run_python
from pnpp_tf.modeling.backbones import get_backbone
from pnpp_tf.modeling.torchvision_resnet import (TorchBatchNormalization, expected_state_dict_shapes,
                                        load_torchvision_state_dict)

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64
TOLERANCE = 1e-4


def build_trunk(weights=None):
    return get_backbone("resnet50_torchvision").build_trunk((IMAGE_SIZE, IMAGE_SIZE, 3), weights)


@pytest.fixture(scope="module")
def trunk():
    return build_trunk()


def load_converter():
    path = ROOT / "tools" / "convert_torchvision_resnet50.py"
    spec = importlib.util.spec_from_file_location("convert_torchvision_resnet50", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- Without PyTorch -------------------------------------------------------------------------


def test_registered_with_torch_normalisation_and_no_named_weights():
    spec = get_backbone("resnet50_torchvision")
    assert (spec.normalization, spec.feature_dim, spec.pretrained_weights) == ("torch", 2048, ())


def test_trunk_has_resnet50_size_and_output(trunk):
    count = lambda weights: sum(int(np.prod(w.shape)) for w in weights)  # noqa: E731
    # torchvision's 25,557,032 parameters minus fc (2048 * 1000 + 1000); the running statistics
    # of the 53 BatchNorm layers (26,560 channels) are the non-trainable weights.
    assert count(trunk.trainable_weights) == 23_508_032
    assert count(trunk.non_trainable_weights) == 2 * 26_560
    assert trunk.name == "backbone"
    assert trunk.output.shape == (None, 2, 2, 2048)
    images = np.random.default_rng(0).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    assert trunk(images, training=False).shape == (2, 2, 2, 2048)


def test_batch_norm_and_convs_follow_pytorch(trunk):
    from keras import layers

    norms = [l for l in trunk.layers if isinstance(l, layers.BatchNormalization)]
    convs = [l for l in trunk.layers if isinstance(l, layers.Conv2D)]
    assert len(norms) == 53 and len(convs) == 53
    assert {(l.epsilon, l.momentum) for l in norms} == {(1e-5, 0.9)}
    # Symmetric padding comes from explicit ZeroPadding2D layers, never from "same".
    assert {(l.padding, l.use_bias) for l in convs} == {("valid", False)}
    assert trunk.get_layer("conv1_pad").padding == ((3, 3), (3, 3))
    assert trunk.get_layer("maxpool_pad").padding == ((1, 1), (1, 1))


def test_stride_sits_on_the_3x3_conv_v1_5(trunk):
    strides = lambda name: trunk.get_layer(name).strides  # noqa: E731
    assert strides("conv1") == (2, 2)
    assert strides("layer1_0_conv2") == (1, 1) and strides("layer1_0_downsample_0") == (1, 1)
    for stage in (2, 3, 4):
        block = f"layer{stage}_0"
        assert strides(f"{block}_conv2") == (2, 2)
        assert strides(f"{block}_conv1") == (1, 1) and strides(f"{block}_conv3") == (1, 1)
        assert strides(f"{block}_downsample_0") == (2, 2)
        assert strides(f"layer{stage}_1_conv2") == (1, 1)
    assert trunk.get_layer("layer2_0_conv2_pad").padding == ((1, 1), (1, 1))


def test_loader_names_missing_unexpected_and_mis_shaped_keys(trunk):
    state = {k: np.zeros(shape, np.float32) for k, (_, shape) in expected_state_dict_shapes(trunk).items()}
    state["fc.weight"] = np.zeros((1000, 2048), np.float32)  # ignored, not "unexpected"
    state["bn1.num_batches_tracked"] = np.array(0, np.int64)
    del state["layer3.2.bn2.running_var"]
    state["layer4.0.conv2.weight"] = np.zeros((512, 512, 1, 1), np.float32)
    state["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    before = trunk.get_layer("conv1").kernel.numpy()
    with pytest.raises(ValueError) as error:
        load_torchvision_state_dict(trunk, state)
    message = str(error.value)
    assert "missing keys (1): layer3.2.bn2.running_var" in message
    assert "unexpected keys (1): layer5.0.conv1.weight" in message
    assert "layer4.0.conv2.weight: got (512, 512, 1, 1), expected (512, 512, 3, 3)" in message
    assert "fc.weight" not in message and "num_batches_tracked" not in message
    # All or nothing: a rejected state dict leaves the weights untouched.
    np.testing.assert_array_equal(trunk.get_layer("conv1").kernel.numpy(), before)


def test_pytorch_files_are_refused_with_a_hint(tmp_path):
    path = tmp_path / "resnet50.pth"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="convert_torchvision_resnet50.py"):
        build_trunk(str(path))


# --- torchvision's initialisation and PyTorch's BatchNorm statistics ---------------------------

# Bounds in standard errors of the statistic: with 53 layers x 3 statistics, a correct init fails
# one of them with probability ~1e-7.
SIGMAS = 6.0


def test_convs_start_kaiming_normal_fan_out_and_batch_norm_at_identity(trunk):
    """torchvision's `ResNet.__init__`: kaiming_normal_(mode="fan_out", nonlinearity="relu"), so
    N(0, 2 / (out * kh * kw)); BatchNorm weight 1, bias 0 (zero_init_residual=False).

    For n draws of N(0, s^2): the sample mean has standard error s / sqrt(n), the sample standard
    deviation a relative one of 1 / sqrt(2 n), the excess kurtosis sqrt(24 / n). The kurtosis tells
    a normal (0) from a uniform (-1.2, Keras' Glorot-uniform default) even for conv1, where the two
    standard deviations are only 2 % apart.
    """
    convs = [l for l in trunk.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 53
    for layer in convs:
        kernel = layer.kernel.numpy().astype(np.float64).ravel()
        kh, kw, _, out = layer.kernel.shape
        expected_std = np.sqrt(2.0 / (out * kh * kw))
        n = kernel.size
        std = kernel.std()
        excess_kurtosis = np.mean((kernel - kernel.mean()) ** 4) / std ** 4 - 3.0
        assert abs(kernel.mean()) <= SIGMAS * expected_std / np.sqrt(n), layer.name
        assert abs(std / expected_std - 1.0) <= SIGMAS / np.sqrt(2.0 * n), (layer.name, std, expected_std)
        assert abs(excess_kurtosis) <= SIGMAS * np.sqrt(24.0 / n), (layer.name, excess_kurtosis)
    norms = [l for l in trunk.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(norms) == 53 and all(isinstance(l, TorchBatchNormalization) for l in norms)
    for layer in norms:
        for variable, value in ((layer.gamma, 1.0), (layer.beta, 0.0), (layer.moving_mean, 0.0),
                                (layer.moving_variance, 1.0)):
            np.testing.assert_array_equal(variable.numpy(), value, err_msg=f"{layer.name} {variable.name}")


def reference_statistics(x, momentum=0.1):
    """PyTorch's BatchNorm2d update from running (0, 1), in float64: (running_mean, running_var)."""
    flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return momentum * flat.mean(0), (1 - momentum) + momentum * flat.var(0, ddof=1)


# Float32 moments of ~1,000 values per channel carry a relative rounding error of a few 1e-7.
STATISTICS_RTOL = 1e-5


def test_running_variance_is_unbiased_and_momentum_is_pytorchs():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 6, 5, 7)).astype(np.float32)
    layer = TorchBatchNormalization()
    outputs = np.asarray(layer(x, training=True))
    mean, variance = reference_statistics(x)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=STATISTICS_RTOL, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=STATISTICS_RTOL)
    # The batch itself is normalised with the biased variance, as in PyTorch.
    flat = x.reshape(-1, 7).astype(np.float64)
    expected = (x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    # Inference uses the running statistics, as the Keras layer does.
    running = np.asarray(layer(x, training=False))
    np.testing.assert_allclose(running, (x - mean) / np.sqrt(variance + 1e-5), rtol=1e-5, atol=1e-5)


def test_running_statistics_after_one_training_step_of_the_trunk():
    """One ProxyNCAModel step: bn1's running statistics are PyTorch's update from conv1's output."""
    from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder
    from pnpp_tf.modeling.optimizers import TorchAdam

    keras.utils.set_random_seed(0)
    embedder = build_embedder("resnet50_torchvision", 32, 8, weights="none")
    trunk = embedder.get_layer("backbone")
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    labels = np.array([0, 0, 1, 1], np.int32)
    # conv1's output before the step, from the weights the step's forward pass used.
    normalised = embedder.get_layer("normalization")(images)
    conv1_out = np.asarray(keras.Model(trunk.input, trunk.get_layer("conv1").output)(normalised))
    model = ProxyNCAModel(embedder, 2)
    model.compile(optimizer=TorchAdam(1e-3), proxy_optimizer=TorchAdam(1.0), freeze_backbone=True)
    model.train_on_batch(images, labels)
    mean, variance = reference_statistics(conv1_out)
    bn1 = trunk.get_layer("bn1")
    np.testing.assert_allclose(bn1.moving_mean.numpy(), mean, rtol=STATISTICS_RTOL, atol=1e-6)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), variance, rtol=STATISTICS_RTOL)


def test_fused_and_composed_training_paths_agree(monkeypatch):
    """The fused kernel (one replica) and the composed ops (synchronised statistics) compute the
    same outputs, running statistics and gradients, to float32 rounding of sums over 120 values."""
    x = tf.constant(np.random.default_rng(2).normal(1.0, 2.0, size=(4, 6, 5, 7)).astype(np.float32))
    results = {}
    for path in ("fused", "composed"):
        layer = TorchBatchNormalization()
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 7).astype(np.float32))
        layer.beta.assign(np.linspace(-1.0, 1.0, 7).astype(np.float32))
        if path == "composed":
            monkeypatch.setattr(layer, "fusable", lambda inputs: False)
        traced = tf.function(lambda images, layer=layer: layer(images, training=True))
        ops_run = {op.type for op in traced.get_concrete_function(x).graph.get_operations()}
        assert ("FusedBatchNormV3" in ops_run) == (path == "fused")
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
        gradients = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results[path] = [layer(x, training=True).numpy(), layer.moving_mean.numpy(),
                         layer.moving_variance.numpy(), *(np.asarray(g) for g in gradients)]
    for fused, composed in zip(results["fused"], results["composed"]):
        np.testing.assert_allclose(fused, composed, rtol=1e-5, atol=1e-5)


def test_mixed_precision_keeps_float32_statistics_of_the_float16_batch():
    x = np.random.default_rng(1).normal(0.5, 2.0, size=(8, 4, 4, 3)).astype(np.float32)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = TorchBatchNormalization()
        outputs = layer(keras.ops.cast(x, "float16"), training=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert outputs.dtype == "float16" and layer.moving_variance.dtype == "float32"
    # The layer sees the float16-rounded batch; its moments are taken in float32.
    mean, variance = reference_statistics(x.astype(np.float16))
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=STATISTICS_RTOL, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=STATISTICS_RTOL)


SYNC_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    from pnpp_tf.modeling.torchvision_resnet import TorchBatchNormalization
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x = np.random.default_rng(0).normal(1.0, 2.0, size=(6, 3, 3, 5)).astype(np.float32)
    # The two replicas' halves differ in mean, so per-replica statistics would not pass.
    x[3:] += 4.0
    with strategy.scope():
        layer = TorchBatchNormalization(synchronized=True)
        layer.build(x.shape)
    halves = strategy.experimental_distribute_values_from_function(
        lambda context: x[3 * context.replica_id_in_sync_group:][:3])
    strategy.run(tf.function(lambda part: layer(part, training=True)), args=(halves,))
    np.savez(sys.argv[1], x=x, mean=layer.moving_mean.numpy(), variance=layer.moving_variance.numpy())
""")


def test_synchronised_statistics_are_the_whole_batch_unbiased_ones(tmp_path):
    out = tmp_path / "statistics.npz"
    result = run_python("-c", SYNC_SCRIPT, str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = np.load(out)
    mean, variance = reference_statistics(saved["x"])
    np.testing.assert_allclose(saved["mean"], mean, rtol=STATISTICS_RTOL, atol=1e-6)
    np.testing.assert_allclose(saved["variance"], variance, rtol=STATISTICS_RTOL)


def test_batch_norm_config_round_trips_and_saved_model_reloads(tmp_path):
    layer = TorchBatchNormalization(name="bn")
    assert (layer.momentum, layer.epsilon) == (0.9, 1e-5)
    clone = TorchBatchNormalization.from_config(layer.get_config())
    assert type(clone) is TorchBatchNormalization and clone.get_config() == layer.get_config()
    inputs = keras.Input((3, 3, 2))
    model = keras.Model(inputs, TorchBatchNormalization(name="bn")(inputs))
    model.get_layer("bn").moving_variance.assign([2.0, 3.0])
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded.get_layer("bn")) is TorchBatchNormalization
    np.testing.assert_array_equal(loaded.get_layer("bn").moving_variance.numpy(), [2.0, 3.0])
    with pytest.raises(ValueError, match="renorm"):
        TorchBatchNormalization(renorm=True)


# --- Against a PyTorch reference ---------------------------------------------------------------


def torch_resnet50():
    """ResNet-50 v1.5 with torchvision's module names (so the state dict has its keys)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, inplanes, width, stride, downsample):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(width * 4)
            self.relu = nn.ReLU()
            self.downsample = downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            inplanes = 64
            for index, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
                stride = 1 if index == 0 else 2
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, width * 4, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(width * 4),
                )
                stage = [Bottleneck(inplanes, width, stride, downsample)]
                stage += [Bottleneck(width * 4, width, 1, None) for _ in range(blocks - 1)]
                setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
                inplanes = width * 4
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2048, 1000)

        def features(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    torch.manual_seed(0)
    model = ResNet50()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                # Every BN tensor random (and away from the identity) so a swapped or untransposed
                # tensor shows; gamma < 1 keeps the residual sums from growing through 16 blocks.
                module.weight.uniform_(0.3, 0.8)
                module.bias.uniform_(-0.3, 0.3)
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Writes the PyTorch model's state dict in each format; returns paths, images and features."""
    torch = pytest.importorskip("torch")
    model = torch_resnet50()
    directory = tmp_path_factory.mktemp("torchvision")
    paths = {"pth": directory / "resnet50.pth"}
    torch.save(model.state_dict(), paths["pth"])
    try:
        from safetensors.torch import save_file
    except ImportError:
        pass
    else:
        paths["safetensors"] = directory / "resnet50.safetensors"
        save_file(model.state_dict(), str(paths["safetensors"]))
    # Already-normalised inputs: both networks see exactly the same numbers.
    images = np.random.default_rng(1).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        features = model.features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    return {"paths": paths, "images": images, "features": features.numpy().transpose(0, 2, 3, 1)}


@pytest.mark.parametrize("file_format", ["pth", "safetensors"])
def test_converted_trunk_matches_pytorch(reference, file_format, tmp_path, capsys):
    if file_format not in reference["paths"]:
        pytest.skip("safetensors is not installed")
    output = tmp_path / "resnet50_torchvision.weights.h5"
    converter = load_converter()
    assert converter.main([f"--input={reference['paths'][file_format]}", f"--output={output}"]) == 0
    assert "converted 265 tensors" in capsys.readouterr().out

    trunk = build_trunk(str(output))
    features = np.asarray(trunk(reference["images"], training=False))
    expected = reference["features"]
    assert features.shape == expected.shape == (2, 2, 2, 2048)
    difference = np.abs(features - expected).max()
    scale = np.abs(expected).max()
    print(f"{file_format}: max |keras - torch| = {difference:.3g} (feature max {scale:.3g}, "
          f"relative {difference / scale:.3g})")
    assert scale > 0.1  # the features are not degenerate, so the comparison means something
    assert difference <= TOLERANCE


def test_converter_names_the_missing_key(tmp_path):
    torch = pytest.importorskip("torch")
    state = torch_resnet50().state_dict()
    del state["layer2.3.bn3.running_mean"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(SystemExit) as error:
        load_converter().main([f"--input={path}", f"--output={tmp_path / 'out.weights.h5'}"])
    assert "missing keys (1): layer2.3.bn3.running_mean" in str(error.value)
    assert not (tmp_path / "out.weights.h5").exists()


def test_loader_suggests_stripping_a_key_prefix(trunk):
    state = {f"module.{k}": np.zeros(shape, np.float32)
             for k, (_, shape) in expected_state_dict_shapes(trunk).items()}
    with pytest.raises(ValueError, match=r"start with 'module\.': convert with --strip_prefix=module\."):
        load_torchvision_state_dict(trunk, state)
