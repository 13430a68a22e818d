"""The backbone registry and the layers of pnpp_tf.modeling.backbones / model that need no KerasHub: the
keras_hub entry without keras-hub installed, preset normalisation and token pooling."""

import sys

import keras
import numpy as np
import pytest

from cli_helpers import REPO, run_python
from pnpp_tf.modeling import backbones, trunks
from pnpp_tf.config import TrainConfig
from pnpp_tf.errors import UserError
from pnpp_tf.modeling.model import TokenPooling, build_embedder


def test_keras_hub_is_a_registry_entry_whose_default_weights_are_the_presets():
    spec = backbones.get_backbone("keras_hub")
    assert "keras_hub" in backbones.available_backbones() and spec.takes_preset
    assert backbones.resolve_weights(spec, "imagenet") == trunks.PRESET_WEIGHTS
    assert backbones.resolve_weights(spec, "preset") == trunks.PRESET_WEIGHTS
    assert backbones.resolve_weights(spec, "none") is None
    assert not backbones.get_backbone("small_cnn").takes_preset


def test_importing_the_package_does_not_import_keras_hub():
    result = run_python("-c", "import sys, pnpp_tf.modeling.model, pnpp_tf.config, pnpp_tf.train; "
                        "print('keras_hub' in sys.modules)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_without_keras_hub_the_flag_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # `import keras_hub` raises ImportError
    message = r'--backbone=keras_hub needs the keras-hub package .*pip install -e "\.\[hub\]"'
    with pytest.raises(UserError, match=message):
        build_embedder("keras_hub", 28, 8, backbone_preset="dinov2_small")


def test_preset_flags_are_checked_together():
    with pytest.raises(UserError, match="--backbone=keras_hub needs --backbone_preset"):
        TrainConfig(backbone="keras_hub", model_dir="run")
    with pytest.raises(UserError, match="only read with --backbone=keras_hub"):
        TrainConfig(backbone="resnet50", backbone_preset="dinov2_small", model_dir="run")
    with pytest.raises(UserError, match="--pooling=cls needs a transformer"):
        TrainConfig(backbone="small_cnn", pooling="cls", model_dir="run")
    with pytest.raises(UserError, match="only read with --backbone=keras_hub"):
        build_embedder("small_cnn", 32, 8, backbone_preset="dinov2_small")
    with pytest.raises(UserError, match="--pooling=cls needs a transformer"):
        build_embedder("small_cnn", 32, 8, pooling="cls")


def test_scale_offset_is_a_converters_normalisation_and_round_trips():
    layer = trunks.ScaleOffset([1 / 58.395, 1 / 57.12, 1 / 57.375], [-2.1179, -2.0357, -1.8044])
    images = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    expected = images * np.array(layer.scale, "float32") + np.array(layer.offset, "float32")
    np.testing.assert_allclose(layer(images).numpy(), expected, rtol=1e-6)
    clone = trunks.ScaleOffset.from_config(layer.get_config())
    assert (clone.scale, clone.offset) == (layer.scale, layer.offset)
    assert trunks.ScaleOffset(1 / 127.5, -1.0)(np.array([[0.0, 255.0]])).numpy().tolist() == [[-1.0, 1.0]]


def tokens_with_huge_prefix(prefix_tokens=5, patches=4, channels=3):
    """Tokens whose CLS and register tokens are 1000 and -1000 (any pooling of them shows)."""
    rng = np.random.default_rng(0)
    tokens = rng.uniform(-1, 1, (2, prefix_tokens + patches, channels)).astype("float32")
    tokens[:, 0] = 1000.0
    tokens[:, 1:prefix_tokens:2] = 1000.0
    tokens[:, 2:prefix_tokens:2] = -1000.0
    return tokens


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_token_pooling_never_pools_cls_or_register_tokens(mode):
    tokens = tokens_with_huge_prefix()
    pooled = TokenPooling(mode, prefix_tokens=5)(tokens).numpy()
    patches = tokens[:, 5:]
    np.testing.assert_allclose(pooled, patches.max(axis=1) if mode == "max" else patches.mean(axis=1), rtol=1e-6)
    assert np.abs(pooled).max() <= 1.0


def test_cls_pooling_is_token_zero_and_the_layer_round_trips():
    tokens = tokens_with_huge_prefix()
    np.testing.assert_array_equal(TokenPooling("cls", 5)(tokens).numpy(), tokens[:, 0])
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(TokenPooling("max", 5)))
    assert (clone.mode, clone.prefix_tokens) == ("max", 5)
    with pytest.raises(ValueError, match="CLS token"):
        TokenPooling("cls", 0)


def test_batch_norm_layers_are_found_in_nested_models():
    inner = build_embedder("small_cnn", 32, 8).get_layer("backbone")
    images = keras.Input((32, 32, 3))
    outer = keras.Model(images, inner(images))
    assert len(trunks.batch_norm_layers(outer)) == 8 == len(trunks.batch_norm_layers(inner))


@pytest.mark.parametrize("name, preset, pooling", [
    ("cub_dinov2_vits14", "dinov2_small", "max"),
    ("sop_dinov2_vits14", "dinov2_small", "max"),
    ("cub_resnet50_tv", "hf://timm/resnet50.tv_in1k", "max"),
])
def test_keras_hub_flagfiles_parse_into_a_config(name, preset, pooling):
    from pnpp_tf import flags as pnpp_flags  # pylint: disable=import-outside-toplevel

    config = pnpp_flags.parse(TrainConfig, ["train", f"--flagfile={REPO / 'configs' / f'{name}.flags'}",
                                            "--model_dir=run"])
    assert (config.backbone, config.backbone_preset, config.pooling, config.weights) == (
        "keras_hub", preset, pooling, "imagenet")
