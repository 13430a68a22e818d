"""KerasHub backbones: `--backbone=keras_hub --backbone_preset=HANDLE_OR_DIR`.

A preset is a Kaggle handle ("dinov2_small", "kaggle://keras/dinov2/keras/dinov2_small/1"), a
Hugging Face handle ("hf://timm/resnet50.tv_in1k", converted by KerasHub on load; both are
downloaded on first use and cached), or a local directory written by `save_to_preset` (offline).
The trunk is the preset's `keras_hub.models.Backbone` wrapped in a model named "backbone"; the
normalisation is the scale and offset of the preset's image converter (its mean and std), without
its resizing, so that the embedder still takes RGB in [0, 255] at `--image_size`.

Transformers return tokens. Where KerasHub 0.32 puts them (read from its embedding layers,
checked by tests/test_keras_hub.py; setup.py pins keras-hub to 0.32.x):
    DINOv2, DINOv3: [CLS, register tokens..., patch tokens...]
    ViT:            [CLS (if use_class_token), patch tokens...]
Any other backbone returning tokens is refused rather than pooled over tokens it may not know.

This module imports keras_hub in its functions only: `import pnpp_tf` stays fast, and works
without the extra.
"""

import math

import keras

from pnpp_tf.modeling.trunks import (BATCH_NORM_MOMENTUM, PRESET_WEIGHTS, ScaleOffset, TokenLayout, Trunk,
                                     batch_norm_layers)
from pnpp_tf.errors import UserError

INSTALL_HINT = 'pip install -e ".[hub]"'

# Backbone class name -> its config -> where its tokens are.
_TOKEN_LAYOUTS = {
    "DINOV2Backbone": lambda config: TokenLayout(1 + int(config["num_register_tokens"]), True),
    "DINOV3Backbone": lambda config: TokenLayout(1 + int(config["num_register_tokens"]), True),
    "ViTBackbone": lambda config: TokenLayout(int(bool(config["use_class_token"])), bool(config["use_class_token"])),
}
# Position embeddings of one grid size, which KerasHub does not interpolate on load.
_FIXED_SIZE = ("ViTBackbone",)


def import_keras_hub():
    """Returns the `keras_hub` module.

    Raises:
        UserError: keras-hub is not installed (or does not import), naming the extra.
    """
    try:
        import keras_hub  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise UserError(f"--backbone=keras_hub needs the keras-hub package ({error}); install the extra: "
                        f"{INSTALL_HINT}") from error
    return keras_hub


def build_hub_trunk(input_shape, weights, preset):
    """Builds a KerasHub preset's backbone as the embedder's trunk.

    Args:
        input_shape: (image_size, image_size, 3).
        weights: `PRESET_WEIGHTS` (the preset's weights), None (its architecture, random weights)
            or the path of a weights file saved from this trunk.
        preset: `--backbone_preset`.

    Returns:
        A `pnpp_tf.modeling.trunks.Trunk`.

    Raises:
        UserError: keras-hub missing, a preset that does not load or has no image
            converter, or an image size the preset cannot take.
    """
    keras_hub = import_keras_hub()
    config = _preset_config(keras_hub, preset)
    class_name = config["class_name"]
    _check_image_size(class_name, config["config"], input_shape[0], preset, weights)
    # Built at --image_size: KerasHub resizes DINOv2's position embeddings as it loads them.
    hub_backbone = _load(lambda: keras_hub.models.Backbone.from_preset(
        preset, load_weights=weights == PRESET_WEIGHTS, image_shape=tuple(input_shape)), preset)
    for layer in batch_norm_layers(hub_backbone):
        layer.momentum = BATCH_NORM_MOMENTUM  # RECIPE: PyTorch's 0.1, as in every CNN trunk here

    images = keras.Input(input_shape, name="backbone_images")
    # DINOv2 and ViT name their input "images", DINOv3 "pixel_values": feed it by its own name.
    feed = {name: images for name in hub_backbone.input} if isinstance(hub_backbone.input, dict) else images
    model = keras.Model(images, hub_backbone(feed), name="backbone")
    if weights not in (None, PRESET_WEIGHTS):
        model.load_weights(weights)
    tokens = _token_layout(class_name, config["config"], model.output.shape, preset)
    return Trunk(model, _normalization(keras_hub, preset), tokens)


def preset_token_layout(preset):
    """The `TokenLayout` of a preset's backbone, or None if it returns a feature map.

    Reads the preset's config only (no weights): for tools that choose flags by backbone kind.
    """
    config = _preset_config(import_keras_hub(), preset)
    layout = _TOKEN_LAYOUTS.get(config["class_name"])
    return None if layout is None else layout(config["config"])


def _preset_config(keras_hub, preset):
    """The preset backbone's Keras config: {"class_name": ..., "config": {...}}.

    Built from the config alone (random weights, nothing but config.json downloaded) and thrown
    away: KerasHub has no public reader of a preset's config for every format (Keras, timm, HF).
    """
    backbone = _load(lambda: keras_hub.models.Backbone.from_preset(preset, load_weights=False), preset)
    return {"class_name": type(backbone).__name__, "config": backbone.get_config()}


def _load(load, preset):
    """`load()`, with a preset that does not load named in a one-line UserError."""
    try:
        return load()
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--backbone_preset={preset}: cannot load this KerasHub preset ({reason}); pass a "
                        "preset handle (downloaded on first use, which needs the network) or a local directory "
                        "written by save_to_preset.") from error


def _check_image_size(class_name, config, image_size, preset, weights):
    patch = config.get("patch_size")
    if patch is None:
        return  # a CNN: any size
    patch = max(patch) if isinstance(patch, (list, tuple)) else int(patch)
    if image_size % patch:
        lower, upper = patch * (image_size // patch), patch * math.ceil(image_size / patch)
        raise UserError(f"--image_size={image_size} is not a multiple of the patch size {patch} of "
                        f"--backbone_preset={preset}; use --image_size={lower or upper} or {upper}.")
    trained = (config.get("image_shape") or (None,))[0]
    if class_name in _FIXED_SIZE and weights == PRESET_WEIGHTS and trained and image_size != trained:
        raise UserError(f"--image_size={image_size}: the position embeddings of --backbone_preset={preset} "
                        f"({class_name}) are for {trained} px and are not resized on load; pass "
                        f"--image_size={trained}, or --weights=none to train from scratch.")


def _token_layout(class_name, config, output_shape, preset):
    if len(output_shape) == 4:
        return None  # a feature map [batch, h, w, channels]
    if class_name not in _TOKEN_LAYOUTS:
        raise UserError(f"--backbone_preset={preset}: {class_name} returns tokens {tuple(output_shape)} in a layout "
                        f"pnpp_tf does not know; supported transformers: "
                        f"{', '.join(sorted(_TOKEN_LAYOUTS))}, or any CNN.")
    return _TOKEN_LAYOUTS[class_name](config)


def _normalization(keras_hub, preset):
    """The preset image converter's scale and offset as a `ScaleOffset` layer."""
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except (OSError, ValueError, KeyError) as error:
        converter, reason = None, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    else:
        reason = "it has none"
    if converter is None:
        raise UserError(f"--backbone_preset={preset}: cannot read the preset's image converter ({reason}), which "
                        "says how its weights expect pixels scaled; save one into the preset directory with "
                        "keras_hub.layers.ImageConverter.from_preset(HANDLE).save_to_preset(DIR).")
    scale = 1.0 if converter.scale is None else converter.scale  # None: the weights take [0, 255]
    return ScaleOffset(scale, converter.offset, name="normalization")
