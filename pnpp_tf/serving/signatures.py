"""What an exported embedder serves: the TF Serving signatures, kept beside the model.

    serving_default     images       float32 [N, S, S, 3], RGB in [0, 255]  ->  embedding [N, D]
    serve_image_bytes   image_bytes  string [N], JPEG or PNG files           ->  embedding [N, D]

Both return L2-normalised embeddings, as `ProxyNCAModel` does. The bytes signature decodes,
resizes and center-crops each image in the graph with the evaluation pipeline's own functions,
after reading its width and height from the file header and refusing any image of more than
`max_pixels` pixels, so a hostile file cannot make the server allocate gigabytes.
"""

import tensorflow as tf

from pnpp_tf.data import image_header, pipeline
from pnpp_tf.errors import UserError
from pnpp_tf.modeling.losses import l2_normalize

IMAGES_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serve_image_bytes"
IMAGES_INPUT = "images"
BYTES_INPUT = "image_bytes"
OUTPUT = "embedding"
# The budget training and evaluation apply to every image too (their --max_pixels).
DEFAULT_MAX_PIXELS = image_header.DEFAULT_MAX_PIXELS


class EmbedderServingModule(tf.Module):
    """Wraps a trained embedder with the two TF Serving signatures.

    Args:
        embedder: the functional model from `pnpp_tf.modeling.model.build_embedder` (or its saved copy),
            taking float32 [N, S, S, 3] RGB images in [0, 255] and returning raw embeddings.
        max_pixels: the largest width x height the bytes signature decodes.

    Attributes:
        image_size, embedding_dim, max_pixels: saved as variables, so a client of the loaded
            SavedModel can read them (`loaded.image_size.numpy()`).
        match_threshold: only once `carry_match_threshold` was called (`--match_threshold`): the
            cosine similarity from which two embeddings are taken for the same item, a float32
            variable (`loaded.match_threshold.numpy()`; `hasattr(loaded, "match_threshold")` says
            whether the export has one).
        serve_images, serve_image_bytes: the `tf.function`s behind the two signatures.
        model_variables: the embedder's weights, as the traced functions read them.
    """

    def __init__(self, embedder, max_pixels=DEFAULT_MAX_PIXELS, name="pnpp_tf_embedder"):
        super().__init__(name=name)
        shape = tuple(embedder.input.shape)
        if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
            raise ValueError(
                f"The embedder must take square RGB images [N, S, S, 3]; its input shape is {shape}."
            )
        if int(max_pixels) < shape[1] * shape[2]:
            raise UserError(f"--max_pixels={max_pixels} is smaller than one {shape[1]}x{shape[2]} input image.")
        self._size = int(shape[1])
        self._max_pixels = int(max_pixels)
        # The embedder is held by the functions below, not as an attribute: what gets saved are
        # the tf.Variables the traced functions read (as keras.export.ExportArchive does), which
        # the TFLite converter can freeze into constants. Saving Keras' variable wrappers instead
        # leaves the TFLite model reading uninitialised resource variables.
        self._embed = lambda images: normalized_embeddings(embedder, images)
        self._embedding_dim = int(embedder.output.shape[-1])
        self.image_size = tf.Variable(self._size, trainable=False, name="image_size")
        self.embedding_dim = tf.Variable(self._embedding_dim, trainable=False, name="embedding_dim")
        self.max_pixels = tf.Variable(
            self._max_pixels, dtype=tf.int64, trainable=False, name="max_pixels")
        self.serve_images = tf.function(self._serve_images, input_signature=[self._images_spec()])
        self.serve_image_bytes = tf.function(
            self._serve_image_bytes, input_signature=[tf.TensorSpec([None], tf.string, BYTES_INPUT)]
        )
        self.model_variables = list(self.tflite_function().variables)

    def carry_match_threshold(self, threshold):
        """Saves `threshold` (a cosine similarity in [-1, 1], as `pnpp_tf.evaluate --calibrate`
        chooses one) with the model, as the variable `match_threshold`."""
        self.match_threshold = tf.Variable(float(threshold), dtype=tf.float32, trainable=False,
                                           name="match_threshold")

    def signatures(self):
        """The signatures to save: `{"serving_default": ..., "serve_image_bytes": ...}`."""
        return {
            IMAGES_SIGNATURE: self.serve_images.get_concrete_function(),
            BYTES_SIGNATURE: self.serve_image_bytes.get_concrete_function(),
        }

    def save(self, path):
        """Writes the SavedModel with both signatures to `path` (a version directory)."""
        tf.saved_model.save(self, path, signatures=self.signatures())

    def tflite_function(self):
        """The concrete function TFLite converts: images -> {"embedding": ...}, as `serve_images`
        computes it but without the empty-batch guard (a TFLite model runs one batch shape)."""
        fn = tf.function(lambda images: {OUTPUT: self._embed(images)})
        return fn.get_concrete_function(self._images_spec())

    def _images_spec(self):
        return tf.TensorSpec([None, self._size, self._size, 3], tf.float32, IMAGES_INPUT)

    def _serve_images(self, images):
        return {OUTPUT: self._embed_batch(images)}

    def _embed_batch(self, images):
        # The Keras layers fail on an empty batch; an empty request gets an empty answer.
        return tf.cond(
            tf.shape(images)[0] > 0,
            lambda: self._embed(images),
            lambda: tf.zeros([0, self._embedding_dim], tf.float32),
        )

    def _serve_image_bytes(self, image_bytes):
        indices = tf.range(tf.size(image_bytes, out_type=tf.int64))
        images = tf.map_fn(
            lambda item: self.decode(item[0], item[1]),
            (image_bytes, indices),
            fn_output_signature=tf.TensorSpec([self._size, self._size, 3], tf.float32),
            parallel_iterations=1,  # one decoded image in memory at a time
        )
        return {OUTPUT: self._embed_batch(images)}

    def decode(self, contents, index=0):
        """Decodes one JPEG or PNG file to the evaluation crop, float32 [S, S, 3] in [0, 255].

        Raises `tf.errors.InvalidArgumentError` (naming `image_bytes[index]`) for data that is
        neither JPEG nor PNG, a header without a positive width and height, or more than
        `max_pixels` pixels (`pipeline.decode_image_bytes`, which reads the header first); the
        decoder raises its own "Invalid JPEG/PNG data" for a corrupt or truncated body.
        """
        fmt = image_header.image_format(contents)
        check = tf.debugging.Assert(
            tf.logical_or(fmt == image_header.JPEG, fmt == image_header.PNG),
            [tf.strings.format("image_bytes[{}] ({} bytes) is not a JPEG or PNG image.",
                               (index, tf.strings.length(contents)))],
        )
        with tf.control_dependencies([check]):
            name = tf.strings.format("image_bytes[{}]", index)
            image = pipeline.decode_image_bytes(contents, self._max_pixels, name)
        return pipeline.resize_and_center_crop(image, self._size)


def normalized_embeddings(embedder, images):
    """L2-normalise(embedder(images)): the embedding every export must reproduce.

    Normalised in the graph by `pnpp_tf.modeling.losses.l2_normalize`, the model's own normaliser, so
    that exports, training and evaluation compute the same unit vectors.

    Args:
        embedder: a Keras model taking float32 [N, S, S, 3] RGB images in [0, 255].
        images: float32 tensor [N, S, S, 3].

    Returns:
        float32 tensor [N, D] of unit rows (zero rows for zero embeddings).
    """
    return l2_normalize(tf.cast(embedder(images, training=False), tf.float32))
