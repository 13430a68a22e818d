"""A trained embedder loaded for inference: from a model_dir (Keras) or an exported SavedModel.

    embedder = load_embedder("runs/demo")     # a model_dir, or an exported SavedModel
    embeddings = embedder(images)             # float32 [N, S, S, 3] in [0, 255] -> [N, D]

Its embeddings are L2-normalised, so cosine similarity is their dot product. This loads a model
that was trained; `pnpp_tf.model.build_embedder` builds a new one to train.
"""

import os
import zipfile

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pnpp_tf.serving import IMAGES_SIGNATURE, OUTPUT, normalized_embeddings


class Embedder:
    """A trained embedder from a model_dir or an exported SavedModel, returning unit vectors.

    Attributes:
        source: the file or directory it was loaded from (absolute).
        kind: "keras" (embedder.keras) or "saved_model".
        image_size: side S of the square crops it takes.
        embedding_dim: D, or None until the first call for a SavedModel that does not record it.
    """

    def __init__(self, fn, source, kind, image_size, embedding_dim):
        self._fn = fn
        self.source = source
        self.kind = kind
        self.image_size = int(image_size)
        self.embedding_dim = embedding_dim

    def __call__(self, images):
        """float32 images [N, S, S, 3] in [0, 255] -> float32 numpy [N, D], unit rows."""
        return np.asarray(self._fn(tf.convert_to_tensor(images, tf.float32)), np.float32)

    def describe(self):
        return f"{self.kind} {self.source} ({self.image_size} px)"


def load_embedder(model):
    """Loads a trained embedder for search.

    Args:
        model: one of
            - a training run's model_dir (holding embedder.keras), or an .keras file;
            - an exported SavedModel version directory (holding saved_model.pb);
            - an export base directory holding numbered versions: the highest version that is a
              complete SavedModel is used, as TF Serving would.

    Returns:
        An `Embedder`.

    Raises:
        ValueError: if `model` is none of those.
    """
    if not model:
        raise ValueError("--model is required: a training run's model_dir or an exported "
                         "SavedModel.")
    if not os.path.exists(model):
        raise ValueError(f"--model={model} does not exist.")
    path = os.path.abspath(model)
    if os.path.isfile(path):
        if path.endswith(".keras"):
            return _load_keras(path)
        raise ValueError(f"--model={model} is a file but not a .keras model; pass a model_dir or "
                         "an exported SavedModel directory.")
    if os.path.isfile(os.path.join(path, "embedder.keras")):
        return _load_keras(os.path.join(path, "embedder.keras"))
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return _load_saved_model(path)
    versions = sorted((int(name) for name in os.listdir(path) if name.isdigit()
                       and os.path.isfile(os.path.join(path, name, "saved_model.pb"))),
                      reverse=True)
    if versions:
        logging.info("Using version %d of the export %s", versions[0], path)
        return _load_saved_model(os.path.join(path, str(versions[0])))
    raise ValueError(f"--model={model} holds no embedder.keras (a training run's model_dir), no "
                     "saved_model.pb (an exported version) and no numbered version directories "
                     "(an export base directory).")


def load_keras_model(path):
    """The Keras model in the .keras file `path` (uncompiled), pnpp_tf's custom layers known.

    Raises:
        ValueError: naming `path`, if it is not a whole .keras file (one cut short by a full
            disk, say, which Keras reports as "File not found").
    """
    import pnpp_tf.model  # noqa: F401 pylint: disable=import-outside-toplevel - registers its layers

    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist.")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a whole .keras file ({os.path.getsize(path)} bytes): it may "
                         "have been cut short. Save or train the model again.")
    return keras.saving.load_model(path, compile=False)


def _load_keras(path):
    embedder = load_keras_model(path)
    shape = tuple(embedder.input.shape)
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2]:
        raise ValueError(f"{path} does not take square images [N, S, S, 3]; input shape {shape}.")
    fn = tf.function(lambda images: normalized_embeddings(embedder, images), reduce_retracing=True)
    return Embedder(fn, path, "keras", shape[1], int(embedder.output.shape[-1]))


def _load_saved_model(path):
    loaded = tf.saved_model.load(path)
    if IMAGES_SIGNATURE not in loaded.signatures:
        raise ValueError(f"The SavedModel {path} has no {IMAGES_SIGNATURE!r} signature; export it "
                         "with python -m pnpp_tf.export.")
    signature = loaded.signatures[IMAGES_SIGNATURE]
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1:
        raise ValueError(f"{path}: {IMAGES_SIGNATURE} takes {sorted(inputs)}; expected one "
                         "images input.")
    (input_name, spec), = inputs.items()
    size = int(loaded.image_size.numpy()) if hasattr(loaded, "image_size") else spec.shape[1]
    if size is None:
        raise ValueError(f"{path} accepts images of any size and records no image_size.")
    dim = int(loaded.embedding_dim.numpy()) if hasattr(loaded, "embedding_dim") else None

    def fn(images):
        outputs = signature(**{input_name: images})
        if OUTPUT not in outputs:
            raise ValueError(f"{path}: {IMAGES_SIGNATURE} returns {sorted(outputs)}, "
                             f"not {OUTPUT!r}.")
        return outputs[OUTPUT]

    # Kept alive with the function: the signature holds only a weak reference to its variables.
    fn.loaded = loaded
    return Embedder(fn, path, "saved_model", size, dim)
