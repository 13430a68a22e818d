"""The embedder as an ONNX model, for ONNX Runtime, Triton and OpenVINO: `pnpp_tf.export --format=onnx`.

    images  float32 [N, S, S, 3], RGB in [0, 255]  ->  embedding  float32 [N, D], L2-normalised

the graph of the SavedModel's `serving_default` (`EmbedderServingModule.tflite_function`, its
preprocessing inside), converted by tf2onnx at opset `OPSET`, with a dynamic batch. The model's
metadata_props say what it takes and returns (`metadata`).
"""

import numpy as np

import pnpp_tf
from pnpp_tf.errors import UserError
from pnpp_tf.serving import signatures

# 17: the newest opset tf2onnx 1.17 writes that ONNX Runtime, Triton's ONNX backend and OpenVINO
# have all run for years; raising it changes the file, so it is pinned (and tested at this value).
OPSET = 17
INSTALL = "pip install 'pnpp_tf[onnx]'"
INPUT_FORMAT = "float32 [N, S, S, 3] RGB, S = image_size, values in [0, 255], the evaluation crop"
# A protobuf message (an ONNX file without external data) cannot exceed 2 GiB.
MAX_MODEL_BYTES = 2**31 - 2**24


def import_onnx():
    """(tf2onnx, onnx, onnxruntime), or a `UserError` naming the extra that installs them."""
    # pylint: disable=import-outside-toplevel - optional extra, imported only for --format=onnx
    try:
        import onnx
        import onnxruntime
        import tf2onnx
    except ImportError as error:
        raise UserError(f"--format=onnx needs tf2onnx, onnx and onnxruntime ({error.name} is missing): "
                        f"{INSTALL}.") from error
    return tf2onnx, onnx, onnxruntime


def check_exportable(embedder):
    """Refuses, before the conversion, an embedder no ONNX file of ours can hold.

    Raises:
        UserError: its float32 weights exceed protobuf's 2 GiB.
    """
    weight_bytes = 4 * embedder.count_params()
    if weight_bytes > MAX_MODEL_BYTES:
        raise UserError(f"--format=onnx: the embedder's weights take {weight_bytes / 2**30:.1f} GiB, over the 2 GiB "
                        "an ONNX file without external data holds; export saved_model or tflite instead.")


def metadata(image_size, embedding_dim, match_threshold=None):
    """The metadata_props of the ONNX model: {key: str}."""
    props = {
        "image_size": str(int(image_size)), "embedding_dim": str(int(embedding_dim)),
        "input": f"{signatures.IMAGES_INPUT}: {INPUT_FORMAT}",
        "output": f"{signatures.OUTPUT}: float32 [N, embedding_dim], L2-normalised (cosine = dot product)",
        "pnpp_tf_version": pnpp_tf.__version__, "opset": str(OPSET),
    }
    if match_threshold is not None:
        props["match_threshold"] = repr(float(match_threshold))
    return props


class OnnxExporter:
    """Converts an embedder (images in [0, 255] -> L2-normalised embedding) to an ONNX model.

    Args:
        module: a `pnpp_tf.serving.signatures.EmbedderServingModule`.
        props: the model's metadata_props ({key: str}, see `metadata`).
    """

    def __init__(self, module, props):
        self._module, self._props = module, dict(props)
        self._tf2onnx, self._onnx, _ = import_onnx()

    def convert(self):
        """The ONNX model, serialised (bytes).

        Raises:
            UserError: the graph holds an op tf2onnx cannot convert (tf2onnx writes such a node
                as it is, so the file would not load), named.
        """
        # TensorFlow's freezer, as tf2onnx and the TFLite converter use it. It is private:
        # setup.py bounds TensorFlow to the releases tests/test_export_onnx.py passed on (2.20-2.21),
        # and those tests fail here if it moves.
        # pylint: disable=import-outside-toplevel
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        # Frozen here rather than by tf2onnx.convert.from_function, which makes every tensor the
        # function captures a graph input: KerasHub's ViT captures its position ids so.
        frozen = convert_variables_to_constants_v2(self._module.tflite_function())
        images, embedding = frozen.inputs[0].name, frozen.outputs[0].name
        model, _ = self._tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(), name="pnpp_tf_embedder", input_names=[images],
            output_names=[embedding], opset=OPSET, custom_op_handlers={"Erfc": (_erfc, [])},
            tensors_to_rename={images: signatures.IMAGES_INPUT, embedding: signatures.OUTPUT})
        try:
            self._onnx.checker.check_model(model)
        except self._onnx.checker.ValidationError as error:
            first = str(error).strip().splitlines()[0]
            raise UserError(f"--format=onnx: tf2onnx {self._tf2onnx.__version__} cannot convert this embedder "
                            f"({first}); export saved_model or tflite instead.") from error
        self._onnx.helper.set_model_props(model, self._props)
        return model.SerializeToString()


def _erfc(ctx, node, name, args):  # pylint: disable=unused-argument - tf2onnx's handler signature
    """Erfc(x) as 1 - Erf(x): ONNX has no Erfc, and TensorFlow's exact GELU (ViT's, DINOv2's) uses it.
    The difference is in the last bits of erfc(x) for x > 3, where GELU multiplies it by ~0."""
    from tf2onnx import utils  # pylint: disable=import-outside-toplevel - imported once tf2onnx runs this

    one = ctx.make_const(f"{name}/one", np.ones([], utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))))
    erf = ctx.make_node("Erf", [node.input[0]], name=f"{name}/erf")
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])
    node.type = "Sub"

