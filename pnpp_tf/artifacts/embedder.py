"""A trained embedder loaded for inference, from a model_dir (Keras) or an export (SavedModel).

    embedder = load_embedder("runs/demo")     # a model_dir, a .keras file, or an export
    embeddings = embedder(images)             # float32 [N, S, S, 3] in [0, 255] -> numpy [N, D]
    found = embedder.embed_files(paths)       # image files -> `pnpp_tf.retrieval.embed.EmbeddedFiles`

Every loader returns an `Embedder` whose embeddings are L2-normalised, so cosine similarity is
their dot product. This loads a model that was trained; `pnpp_tf.modeling.model.build_embedder` builds
one to train.

The input size follows one rule (`image_size_of`): a model taking [N, S, S, 3] images crops to S;
one taking [N, None, None, 3] (any size) crops to the caller's `image_size`, and without one it
cannot be used; any other input (not square, not RGB, not a 4-D batch) is a `SignatureError`.
"""

import os

import tensorflow as tf

from pnpp_tf.retrieval.embed import ImageEmbedder
from pnpp_tf.serving import signatures
from pnpp_tf.artifacts.errors import (CorruptArtifactError, MissingArtifactError, SignatureError,
                                      UnloadableArtifactError)
from pnpp_tf.artifacts.export_dir import ExportDir, is_saved_model
from pnpp_tf.artifacts.model_dir import ModelDir, load_keras_model
from pnpp_tf.errors import UserError

KINDS = ("keras", "saved_model")


def image_size_of(shape, source):
    """The side S of the square crops a model with input `shape` takes; None if it takes any size.

    Args:
        shape: the input shape, batch first (a tuple or a `tf.TensorShape`).
        source: the model's file, for the message.

    Raises:
        SignatureError: `shape` is not [N, S, S, 3] nor [N, None, None, 3].
    """
    shape = tf.TensorShape(shape)
    dims = tuple(shape.as_list()) if shape.rank is not None else ()
    if len(dims) == 4 and dims[3] in (3, None) and dims[1] == dims[2]:
        return dims[1]
    raise SignatureError(f"{source} does not take square RGB images [N, S, S, 3]; its input shape "
                         f"is {dims or 'unknown'}.")


class Embedder:
    """A trained embedder returning unit vectors, however it was saved.

    Args:
        inference: callable as a Keras model, `inference(images, training=False)` -> float32
            tf.Tensor [N, D] of unit rows; traceable inside a `tf.function`.
        source: the file or directory it was loaded from (absolute).
        kind: "keras" (a .keras file) or "saved_model".
        image_size: side S of the square crops it takes.
        embedding_dim: D, or None if a SavedModel records it nowhere.
        keras_model: the `keras.Model` itself, for kind "keras" (None otherwise).

    Attributes:
        The arguments, by the same names, and `image_embedder`: the `ImageEmbedder` of
        `inference`, its one trace, which every call and `embed_files` run.
    """

    def __init__(self, inference, source, kind, image_size, embedding_dim, keras_model=None):
        self.inference = inference
        self.source = source
        self.kind = kind
        self.image_size = int(image_size)
        self.embedding_dim = embedding_dim
        self.keras_model = keras_model
        self.image_embedder = ImageEmbedder(inference, self.image_size)

    def __call__(self, images):
        """float32 images [N, S, S, 3] in [0, 255] -> float32 numpy [N, D], unit rows."""
        return self.image_embedder(images)

    def embed_files(self, paths, **options):
        """Embeds image files: `pnpp_tf.retrieval.embed.ImageEmbedder.embed_files` (the same
        options: batch_size, max_pixels, on_bad_image, ...), at this embedder's crop size."""
        return self.image_embedder.embed_files(paths, **options)

    def describe(self):
        return f"{self.kind} {self.source} ({self.image_size} px)"


class KerasInference:
    """`signatures.normalized_embeddings` of a Keras embedder (traced by the `Embedder`)."""

    def __init__(self, model):
        self._model = model

    def __call__(self, images, training=False):
        del training  # always inference
        return signatures.normalized_embeddings(self._model, tf.cast(images, tf.float32))


class _SignatureInference:
    """A SavedModel's images signature (`signatures.IMAGES_SIGNATURE`), checked once, at load.

    Raises:
        SignatureError: no such signature, not one image-batch input, or no embedding output.
    """

    def __init__(self, loaded, path):
        name, output = signatures.IMAGES_SIGNATURE, signatures.OUTPUT
        if name not in loaded.signatures:
            raise SignatureError(f"SavedModel {path} has no {name!r} signature (it has "
                                 f"{sorted(loaded.signatures) or 'none'}); export it with "
                                 "python -m pnpp_tf.export.")
        self._loaded = loaded  # the signature holds only a weak reference to its variables
        self._function = loaded.signatures[name]
        inputs = self._function.structured_input_signature[1]
        if len(inputs) != 1 or next(iter(inputs.values())).shape.rank != 4:
            raise SignatureError(f"SavedModel {path}: {name} must take one float32 image batch "
                                 f"[N, S, S, 3]; it takes {inputs}.")
        (self._input, spec), = inputs.items()
        outputs = self._function.structured_outputs
        if output not in outputs:
            raise SignatureError(f"SavedModel {path}: {name} has no output named {output!r} (it "
                                 f"has {sorted(outputs)}).")
        self.image_size = image_size_of(spec.shape, f"SavedModel {path}")
        if self.image_size is None and hasattr(loaded, "image_size"):
            self.image_size = int(loaded.image_size.numpy())  # recorded by pnpp_tf.export
        recorded = getattr(loaded, "embedding_dim", None)
        self.embedding_dim = int(recorded.numpy()) if recorded is not None else outputs[output].shape[-1]

    def __call__(self, images, training=False):
        del training  # always inference
        return self._function(**{self._input: tf.cast(images, tf.float32)})[signatures.OUTPUT]


def load_keras_embedder(path, image_size=None):
    """The embedder in a .keras file.

    Args:
        path: the .keras file.
        image_size: the crop size for a model taking any size (see the module's docstring).

    Raises:
        MissingArtifactError, CorruptArtifactError, UnloadableArtifactError: see
            `load_keras_model`.
        SignatureError: its input is not an image batch it can crop to (the module's rule).
    """
    path = os.path.abspath(path)
    model = load_keras_model(path)
    size = _crop_size(image_size_of(model.input_shape, path), image_size, path)
    return Embedder(KerasInference(model), path, "keras", size, int(model.output.shape[-1]),
                    keras_model=model)


def load_model_dir_embedder(model_dir, flag="--model_dir", image_size=None,
                            hint="train a model there first (python -m pnpp_tf.train)"):
    """The embedder.keras of a training run's directory; as `load_keras_embedder`, and:

    Raises:
        MissingArtifactError: `model_dir` has no embedder.keras (the message names `flag` and
            ends with `hint`).
    """
    return load_keras_embedder(ModelDir(model_dir, flag).require_embedder(hint), image_size)


def load_saved_model_embedder(path, flag="--saved_model", image_size=None):
    """An exported SavedModel's `serving_default` signature.

    Args:
        path: a SavedModel directory, or an export base directory of numbered versions (its
            highest published version is used, see `pnpp_tf.artifacts.export_dir`).
        flag: how the user named it, for messages.
        image_size: the crop size for a model taking any size (see the module's docstring).

    Raises:
        MissingArtifactError: `path` is neither.
        UnloadableArtifactError: TensorFlow could not load it (a cut-short saved_model.pb, missing
            variables; its error is the `__cause__`).
        SignatureError: its signature does not map images to an embedding.
    """
    path = os.path.abspath(ExportDir(path, flag).served_path())
    try:
        loaded = tf.saved_model.load(path)
    except (OSError, ValueError, tf.errors.OpError) as error:
        first = (getattr(error, "message", None) or str(error)).strip().splitlines()
        raise UnloadableArtifactError(f"{flag}={path} could not be loaded "
                                      f"({type(error).__name__}: {first[0] if first else ''}); "
                                      "export it again.") from error
    signature = _SignatureInference(loaded, path)
    size = _crop_size(signature.image_size, image_size, f"SavedModel {path}")
    return Embedder(signature, path, "saved_model", size, signature.embedding_dim)


def load_embedder(model, flag="--model", image_size=None):
    """Loads a trained embedder, whatever `model` is of those below.

    Args:
        model: a training run's model_dir (holding embedder.keras) or a .keras file; an exported
            SavedModel version directory (holding saved_model.pb); or an export base directory
            of numbered versions (the highest published one is used, see
            `pnpp_tf.artifacts.export_dir`).
        flag: how the user named `model`, for messages.
        image_size: the crop size for a model taking any size (see the module's docstring).

    Returns:
        An `Embedder`.

    Raises:
        UserError: no `model` given.
        MissingArtifactError: `model` does not exist, or holds none of those.
        CorruptArtifactError: a file that is not a .keras model, or a cut-short one.
        UnloadableArtifactError, SignatureError: as `load_keras_embedder` and
            `load_saved_model_embedder` raise them.
    """
    if not model:
        raise UserError(f"{flag} is required: a training run's model_dir or an exported SavedModel.")
    if not os.path.exists(model):
        raise MissingArtifactError(f"{flag}={model} does not exist.")
    if os.path.isfile(model):
        if model.endswith(".keras"):
            return load_keras_embedder(model, image_size)
        raise CorruptArtifactError(f"{flag}={model} is a file but not a .keras model; pass a "
                                   "model_dir or an exported SavedModel directory.")
    run = ModelDir(model, flag)
    if run.has_embedder():
        return load_keras_embedder(run.embedder_path, image_size)
    # Any SavedModel version, visible or not: `served_path` then names those it passes over.
    if is_saved_model(model) or ExportDir(model).saved_model_dirs():
        return load_saved_model_embedder(model, flag, image_size)
    raise MissingArtifactError(
        f"{flag}={model} has no embedder.keras (a training run's model_dir), no saved_model.pb "
        "(an exported version) and no numbered version directories (an export base directory).")


def _crop_size(size, fallback, source):
    if size is not None:
        return size
    if fallback is None:
        raise SignatureError(f"{source} takes images of any size and records none, so there is no "
                             "crop size to use; export it with pnpp_tf.export, which fixes one.")
    return int(fallback)
