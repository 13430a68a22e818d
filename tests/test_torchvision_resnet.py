"""The torchvision-exact ResNet-50 backbone and its state-dict converter.

The PyTorch tests build a ResNet-50 v1.5 from plain `torch.nn` modules (torchvision is not a
dependency), with the same module names as torchvision so its state dict has torchvision's keys,
and check that the converted Keras trunk computes the same feature map.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

from pnpp_tf.backbones import get_backbone
from pnpp_tf.torchvision_resnet import expected_state_dict_shapes, load_torchvision_state_dict

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
