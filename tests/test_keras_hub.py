"""--backbone=keras_hub: tiny DINOv2, ViT and ResNet presets saved to local directories (offline),
built into the embedder, pooled, trained, resumed and exported.

Skipped without keras-hub (the `hub` extra); the end-to-end runs are marked slow.
"""

import json
import sys

import numpy as np
import pytest

# ImportError as well: a keras-hub that does not import (say, a mismatched tensorflow-text) is missing too.
keras_hub = pytest.importorskip("keras_hub", reason='keras-hub is not installed: pip install -e ".[hub]"',
                                exc_type=ImportError)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import hub_presets  # noqa: E402
from cli_helpers import kill_after_first_checkpoint, run_module  # noqa: E402
from pnpp_tf.modeling.trunks import TokenLayout, batch_norm_layers  # noqa: E402
from pnpp_tf.config import TrainConfig  # noqa: E402
from pnpp_tf.errors import UserError  # noqa: E402
from pnpp_tf.modeling.hub_backbones import preset_token_layout  # noqa: E402
from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder  # noqa: E402
from pnpp_tf.modeling.optimizers import TorchAdam  # noqa: E402

SIZE = hub_presets.IMAGE_SIZE


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """{family: (preset dir, the backbone saved there)}."""
    root = tmp_path_factory.mktemp("presets")
    return {family: hub_presets.save_preset(root / family, family) for family in hub_presets.FAMILIES}


def embedder(preset, pooling="max", weights="imagenet", image_size=SIZE, **kwargs):
    keras.utils.set_random_seed(0)
    return build_embedder("keras_hub", image_size, 8, pooling, weights=weights, backbone_preset=preset, **kwargs)


def images(count=4, size=SIZE):
    return np.random.default_rng(0).uniform(0, 255, (count, size, size, 3)).astype("float32")


# --- KerasHub 0.32's token layout, which pnpp_tf.modeling.hub_backbones relies on ---------------------


def test_dinov2_puts_cls_first_then_the_register_tokens_then_the_patches(presets):
    # If this fails after a keras-hub upgrade, update _TOKEN_LAYOUTS and the pin in setup.py.
    _, backbone = presets["dinov2"]
    layer = backbone.embeddings
    tokens = layer(tf.constant(images() / 255.0)).numpy()
    assert tokens.shape == (4, 1 + hub_presets.REGISTER_TOKENS + (SIZE // 14) ** 2, 16)
    position = layer.interpolated_position_embeddings.numpy()[0]
    np.testing.assert_allclose(tokens[:, 0], np.broadcast_to(layer.cls_token.numpy()[0, 0] + position[0], (4, 16)),
                               atol=1e-6)
    registers = layer.register_tokens.numpy()[0]
    np.testing.assert_allclose(tokens[:, 1:1 + hub_presets.REGISTER_TOKENS],
                               np.broadcast_to(registers, (4,) + registers.shape))
    assert preset_token_layout(presets["dinov2"][0]) == TokenLayout(1 + hub_presets.REGISTER_TOKENS, True)


def test_vit_puts_its_class_token_first(presets):
    _, backbone = presets["vit"]
    layer = backbone.get_layer("vit_patching_and_embedding")
    tokens = layer(tf.constant(images() / 255.0)).numpy()
    assert tokens.shape == (4, 1 + (SIZE // 7) ** 2, 16)
    expected = layer.class_token.numpy().reshape(16) + layer.position_embedding.embeddings.numpy()[0]
    np.testing.assert_allclose(tokens[:, 0], np.broadcast_to(expected, (4, 16)), atol=1e-6)
    assert preset_token_layout(presets["vit"][0]) == TokenLayout(1, True)
    assert preset_token_layout(presets["resnet"][0]) is None


# --- The embedder ---------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["max", "avg", "cls"])
def test_token_pooling_sees_only_the_patch_tokens_never_the_registers(presets, pooling):
    model = embedder(presets["dinov2"][0], pooling)
    x = images()
    trunk = model.get_layer("backbone")
    tokens = trunk(model.get_layer("normalization")(x)).numpy()
    head = keras.Sequential([model.get_layer("layer_norm"), model.get_layer("embedding")])
    first_patch = 1 + hub_presets.REGISTER_TOKENS
    pooled = {"max": lambda t: t.max(axis=1), "avg": lambda t: t.mean(axis=1), "cls": lambda t: t[:, 0]}[pooling]
    expected = head(pooled(tokens[:, first_patch:] if pooling != "cls" else tokens)).numpy()
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    if pooling != "cls":
        # Pooling the registers (or the CLS token) with the patches would give other embeddings.
        with_registers = head(pooled(tokens[:, 1:])).numpy()
        with_cls = head(pooled(tokens)).numpy()
        assert np.abs(with_registers - expected).max() > 1e-3 and np.abs(with_cls - expected).max() > 1e-3


@pytest.mark.parametrize("pooling", ["max", "avg", "cls"])
def test_each_pooling_mode_on_a_vit(presets, pooling):
    model = embedder(presets["vit"][0], pooling)
    assert model.get_layer(f"token_{pooling}_pool").prefix_tokens == 1
    assert model(images()).shape == (4, 8)


def test_cls_pooling_needs_a_cls_token(presets, tmp_path):
    preset, _ = hub_presets.save_preset(tmp_path / "vit_no_cls", "vit", use_class_token=False)
    assert embedder(preset, "max").get_layer("token_max_pool").prefix_tokens == 0
    with pytest.raises(UserError, match="--pooling=cls: --backbone_preset=.* has no CLS token"):
        embedder(preset, "cls")
    with pytest.raises(UserError, match="--pooling=cls needs a transformer.*gives a feature map"):
        embedder(presets["resnet"][0], "cls")


def test_cnn_preset_keeps_feature_map_pooling_and_pytorch_batchnorm_momentum(presets):
    model = embedder(presets["resnet"][0], "avg")
    assert model.get_layer("global_avg_pool") is not None
    norms = batch_norm_layers(model.get_layer("backbone"))
    assert len(norms) == 6 and {layer.momentum for layer in norms} == {0.9}
    assert model.get_layer("embedding").kernel.shape == (32, 8)


def test_normalisation_is_the_preset_converters_scale_and_offset(presets):
    preset = presets["dinov2"][0]
    converter = keras_hub.layers.ImageConverter.from_preset(preset, image_size=None)
    model = embedder(preset)
    layer = model.get_layer("normalization")
    np.testing.assert_allclose(layer.scale, hub_presets.IMAGENET_SCALE)
    np.testing.assert_allclose(layer(images()).numpy(), converter(images()).numpy(), rtol=1e-6, atol=1e-5)
    assert model.input.shape == (None, SIZE, SIZE, 3)  # raw RGB at --image_size: no resizing in the embedder


def test_default_weights_are_the_presets_and_none_keeps_its_architecture(presets):
    preset, saved = presets["vit"]
    hub = lambda model: model.get_layer("backbone").layers[-1]  # noqa: E731 - the KerasHub backbone
    loaded = embedder(preset)  # --weights=imagenet, the default
    for ours, theirs in zip(hub(loaded).get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    random = embedder(preset, weights="none")
    assert [w.shape for w in hub(random).get_weights()] == [w.shape for w in saved.get_weights()]
    assert any(not np.array_equal(a, b) for a, b in zip(hub(random).get_weights(), saved.get_weights()))


def test_dinov2_resizes_its_position_embeddings_to_the_image_size(presets):
    assert embedder(presets["dinov2"][0], image_size=56)(images(2, 56)).shape == (2, 8)


@pytest.mark.parametrize("family, size, weights, message", [
    ("dinov2", 30, "imagenet", "--image_size=30 is not a multiple of the patch size 14 .*use --image_size=28 or 42"),
    ("vit", 30, "none", "--image_size=30 is not a multiple of the patch size 7 .*use --image_size=28 or 35"),
    ("vit", 56, "imagenet", "--image_size=56: the position embeddings .* are for 28 px .*--weights=none"),
])
def test_image_sizes_a_preset_cannot_take_are_refused(presets, family, size, weights, message):
    with pytest.raises(UserError, match=message):
        embedder(presets[family][0], weights=weights, image_size=size)


def test_vit_from_scratch_takes_another_multiple_of_its_patch(presets):
    assert embedder(presets["vit"][0], weights="none", image_size=42)(images(1, 42)).shape == (1, 8)


def test_bad_presets_are_named(tmp_path):
    with pytest.raises(UserError, match="--backbone_preset=.*nowhere: cannot load this KerasHub preset"):
        embedder(str(tmp_path / "nowhere"))
    preset, _ = hub_presets.save_preset(tmp_path / "bare", "resnet", converter=False)
    with pytest.raises(UserError, match="cannot read the preset's image converter.*save_to_preset"):
        embedder(preset)
    with pytest.raises(UserError, match="needs --backbone_preset"):
        build_embedder("keras_hub", SIZE, 8)


def test_config_checks_the_preset_flags(presets):
    with pytest.raises(UserError, match="--backbone=keras_hub needs --backbone_preset=HANDLE_OR_DIR"):
        TrainConfig(backbone="keras_hub", model_dir="run")
    with pytest.raises(UserError, match="only read with --backbone=keras_hub"):
        TrainConfig(backbone="small_cnn", backbone_preset=presets["vit"][0], model_dir="run")
    config = TrainConfig(backbone="keras_hub", backbone_preset=presets["vit"][0], pooling="cls", model_dir="run")
    assert config.weights == "imagenet"  # the default, meaning the preset's weights


def test_warmup_freezes_the_hub_backbone_and_the_model_round_trips(presets, tmp_path):
    model = ProxyNCAModel(embedder(presets["dinov2"][0]), num_classes=2)
    model.compile(optimizer=TorchAdam(1e-2), proxy_optimizer=TorchAdam(1.0), freeze_backbone=True)
    backbone = model.embedder.get_layer("backbone")
    before = [w.numpy().copy() for w in backbone.trainable_weights]
    model.train_on_batch(images(), np.array([0, 0, 1, 1]))
    assert before and all(np.array_equal(b, w.numpy()) for b, w in zip(before, backbone.trainable_weights))
    model.embedder.save(tmp_path / "embedder.keras")
    loaded = keras.saving.load_model(tmp_path / "embedder.keras", compile=False)
    np.testing.assert_allclose(loaded(images()).numpy(), model.embedder(images()).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_bfloat16"])
def test_mixed_precision_keeps_the_embedding_float32(presets, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = embedder(presets["dinov2"][0])
        assert model.get_layer("normalization").compute_dtype == "bfloat16"
        # The preset's saved float32 policy does not stick: the trunk computes in bfloat16.
        assert model.get_layer("backbone").layers[-1].compute_dtype == "bfloat16"
        assert model(images()).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


# --- End to end: train from a preset directory, kill, resume, export --------------------------

RUN = ("--dataset=glyphs", "--backbone=keras_hub", f"--image_size={SIZE}", "--embedding_dim=16", "--batch_size=32",
       "--classes_per_batch=8", "--warmup_epochs=1", "--epochs=1", "--lr=1e-3", "--proxy_lr=10", "--eval_every=0",
       "--eval_ks=1", "--verbose=0", "--deterministic", "--checkpoint_every_steps=10", "--flip=false")
MIN_MEAN_COSINE = 0.9999


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    from pnpp_tf.data.glyphs import ensure_glyphs  # pylint: disable=import-outside-toplevel

    data_dir = tmp_path_factory.mktemp("glyphs") / "glyphs"
    ensure_glyphs(str(data_dir))
    return str(data_dir)


def exported_embeddings(export_dir, test_images, png_files):
    """{name: L2-normalised embeddings} of both SavedModel signatures and the float32 TFLite model."""
    loaded = tf.saved_model.load(str(export_dir / "1"))
    embeddings = {
        "serving_default": loaded.signatures["serving_default"](images=tf.constant(test_images))["embedding"],
        "serve_image_bytes": loaded.signatures["serve_image_bytes"](
            image_bytes=tf.constant([open(p, "rb").read() for p in png_files]))["embedding"],
    }
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    run = litert.Interpreter(model_path=str(export_dir / "tflite" / "1" / "embedder_float32.tflite")
                             ).get_signature_runner("serving_default")
    embeddings["tflite_float32"] = np.stack([run(images=image[None])["embedding"][0] for image in test_images])
    return {name: np.asarray(e) / np.linalg.norm(e, axis=1, keepdims=True) for name, e in embeddings.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family, pooling", [("dinov2", "max"), ("vit", "cls"), ("resnet", "max")])
def test_train_from_a_preset_directory_resume_after_a_kill_and_export(tmp_path, glyphs, family, pooling):
    from pnpp_tf.serving import signatures  # pylint: disable=import-outside-toplevel
    from pnpp_tf.data import load_splits, pipeline  # pylint: disable=import-outside-toplevel

    preset, _ = hub_presets.save_preset(tmp_path / "preset", family)
    model_dir = tmp_path / "run"
    args = (*RUN, f"--backbone_preset={preset}", f"--pooling={pooling}", f"--data_dir={glyphs}",
            f"--model_dir={model_dir}")
    kill_after_first_checkpoint([sys.executable, "-m", "pnpp_tf.train", *args], model_dir)
    resumed = run_module("pnpp_tf.train", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    results = json.loads((model_dir / "results.json").read_text())
    assert results["flags"]["backbone_preset"] == preset and results["flags"]["weights"] == "imagenet"
    assert 0.0 <= results["metrics"]["recall@1"] <= 1.0

    export_dir = tmp_path / "export"
    exported = run_module("pnpp_tf.export", f"--model_dir={model_dir}", f"--export_dir={export_dir}",
                          "--format=saved_model,tflite", "--tflite_variants=float32", "--max_eval_images=64",
                          "--latency_images=2")
    assert exported.returncode == 0, exported.stderr[-3000:]
    test_paths = load_splits("glyphs", glyphs)["test"].paths[:48]
    test_images = np.concatenate(list(pipeline.eval_dataset(test_paths, SIZE).as_numpy_iterator()))
    embedder = keras.saving.load_model(str(model_dir / "embedder.keras"), compile=False)
    reference = signatures.normalized_embeddings(embedder, test_images).numpy()
    for name, embeddings in exported_embeddings(export_dir, test_images, test_paths).items():
        mean_cosine = float(np.mean(np.sum(embeddings * reference, axis=1)))
        assert mean_cosine >= MIN_MEAN_COSINE, (name, mean_cosine)
