"""pnpp_tf.export --format=onnx: every backbone family converted to ONNX and run by ONNX Runtime as
Keras runs it, and the ONNX folder staged, published, reported and cleaned up as TFLite's is.

Skipped without the `onnx` extra; the ResNet-50 conversions (about 15 s each) are marked slow.
"""

import builtins
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install -e '.[onnx]'")
onnx = pytest.importorskip("onnx", reason="onnx is not installed: pip install -e '.[onnx]'")
pytest.importorskip("tf2onnx", reason="tf2onnx is not installed: pip install -e '.[onnx]'")

from conftest import make_folder_dataset  # noqa: E402
from pnpp_tf import export  # noqa: E402
from pnpp_tf.artifacts import ExportDir  # noqa: E402
from pnpp_tf.config import ExportConfig  # noqa: E402
from pnpp_tf.errors import UserError  # noqa: E402
from pnpp_tf.modeling.model import build_embedder  # noqa: E402
from pnpp_tf.serving import onnx_export, parity, signatures  # noqa: E402

MIN_MEAN_COSINE = parity.MIN_MEAN_COSINE["onnx"]


def hub_embedder(tmp_path, family):
    """An embedder on a tiny local KerasHub preset of `family`, with random weights."""
    pytest.importorskip("keras_hub", reason="keras-hub is not installed: pip install -e '.[hub]'",
                        exc_type=ImportError)
    import hub_presets  # pylint: disable=import-outside-toplevel - it imports keras_hub

    preset, _ = hub_presets.save_preset(tmp_path / family, family)
    pooling = "max" if family == "resnet" else "cls"
    # Random weights from the preset's architecture: nothing loaded, nothing downloaded.
    return build_embedder("keras_hub", hub_presets.IMAGE_SIZE, 8, pooling, weights="none", backbone_preset=preset)


def to_onnx(embedder, props=None):
    """(the ONNX model as bytes, an ONNX Runtime session of it)."""
    module = signatures.EmbedderServingModule(embedder)
    model = onnx_export.OnnxExporter(module, props or {}).convert()
    return model, onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])


def assert_as_keras(embedder, session):
    """The session embeds random images as Keras does, at batch 1 and 3 (the batch is dynamic)."""
    size = int(embedder.input.shape[1])
    (images,), (embedding,) = session.get_inputs(), session.get_outputs()
    assert (images.name, embedding.name) == (signatures.IMAGES_INPUT, signatures.OUTPUT)
    assert images.shape[1:] == [size, size, 3] and not isinstance(images.shape[0], int)
    for batch in (1, 3):
        pixels = np.random.default_rng(batch).uniform(0, 255, (batch, size, size, 3)).astype("float32")
        reference = signatures.normalized_embeddings(embedder, pixels).numpy()
        ours = session.run(None, {"images": pixels})[0]
        assert ours.shape == reference.shape
        cosine = np.sum(ours * reference, axis=1) / np.linalg.norm(ours, axis=1)
        assert cosine.min() >= MIN_MEAN_COSINE, cosine


@pytest.mark.parametrize("backbone", [
    "small_cnn",
    pytest.param("resnet50", marks=pytest.mark.slow),
    pytest.param("resnet50_torchvision", marks=pytest.mark.slow),  # its own BatchNorm layers
])
def test_registry_backbones_convert_as_keras_runs_them(backbone):
    keras.utils.set_random_seed(0)
    embedder = build_embedder(backbone, 32, 8, weights="none")
    assert_as_keras(embedder, to_onnx(embedder)[1])


@pytest.mark.parametrize("family", ["dinov2", "vit", "resnet"])
def test_keras_hub_presets_convert_as_keras_runs_them(tmp_path, family):
    # DINOv2's and ViT's exact GELU is TensorFlow's Erfc, which ONNX lacks; ViT captures its
    # position ids as a tensor, which tf2onnx's from_function would make an input.
    keras.utils.set_random_seed(0)
    embedder = hub_embedder(tmp_path, family)
    assert_as_keras(embedder, to_onnx(embedder)[1])


def test_metadata_props_say_what_the_model_takes():
    keras.utils.set_random_seed(0)
    embedder = build_embedder("small_cnn", 32, 8, weights="none")
    model, _ = to_onnx(embedder, onnx_export.metadata(32, 8, match_threshold=0.25))
    loaded = onnx.load_from_string(model)
    props = {prop.key: prop.value for prop in loaded.metadata_props}
    assert props["image_size"] == "32" and props["embedding_dim"] == "8" and props["match_threshold"] == "0.25"
    assert "[0, 255]" in props["input"] and props["opset"] == str(onnx_export.OPSET)
    assert [opset.version for opset in loaded.opset_import if opset.domain in ("", "ai.onnx")] == [onnx_export.OPSET]
    assert "match_threshold" not in onnx_export.metadata(32, 8)


def test_an_op_tf2onnx_cannot_convert_is_refused_in_one_line():
    inputs = keras.Input((16, 16, 3))
    # Igamma has no ONNX conversion: tf2onnx would write it as it is, into a file that does not load.
    outputs = keras.layers.Lambda(lambda x: tf.math.igamma(tf.reduce_mean(x, [1, 2]) + 1.0, 2.0))(inputs)
    with pytest.raises(UserError, match="cannot convert this embedder") as error:
        to_onnx(keras.Model(inputs, outputs))
    assert "\n" not in str(error.value)


def test_weights_over_two_gib_are_refused_before_the_conversion():
    class Huge:
        def count_params(self):
            return 600_000_000

    with pytest.raises(UserError, match="2.2 GiB, over the 2 GiB") as error:
        onnx_export.check_exportable(Huge())
    assert "\n" not in str(error.value)


# --- pnpp_tf.export --format=onnx -----------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("onnx_data") / "data")


def export_onnx(tiny_model, data_dir, export_dir, **kwargs):
    return export.export(tiny_model["model_dir"], str(export_dir), formats=("saved_model", "onnx"), dataset="folder",
                         data_dir=data_dir, latency_images=2, **kwargs)


@pytest.fixture(scope="module")
def exported(tiny_model, data_dir, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("onnx_export") / "export"
    report = export_onnx(tiny_model, data_dir, export_dir, match_threshold=0.42)
    return {"export_dir": export_dir, "report": report}


def test_export_publishes_the_onnx_model_beside_the_saved_model(exported):
    export_dir = exported["export_dir"]
    path = export_dir / "onnx" / "1" / "embedder.onnx"
    assert sorted(os.listdir(export_dir)) == ["1", "export.lock", "onnx", "parity"]
    assert os.listdir(export_dir / "onnx" / "1") == ["embedder.onnx"]
    assert ExportDir(str(export_dir)).onnx_path(1) == str(path)
    props = {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}
    assert props["image_size"] == "32" and props["embedding_dim"] == "16"
    assert props["match_threshold"] == "0.42" and props["pnpp_tf_version"]


def test_the_report_has_an_onnx_row_and_the_threshold(exported):
    report = json.loads((exported["export_dir"] / "parity" / "1.json").read_text())
    rows = {row["name"]: row for row in report["variants"]}
    assert list(rows) == ["keras", "saved_model", "saved_model_bytes", "onnx"]
    onnx_row = rows["onnx"]
    assert onnx_row["passed"] is True and onnx_row["min_mean_cosine"] == MIN_MEAN_COSINE
    assert onnx_row["path"] == str(exported["export_dir"] / "onnx" / "1" / "embedder.onnx")
    assert onnx_row["recall@1"] == rows["keras"]["recall@1"] and onnx_row["size_bytes"] > 0
    assert onnx_row["latency_ms"] > 0 and onnx_row["images_per_second"] > 0
    assert report["match_threshold"] == 0.42 and report["formats"] == ["saved_model", "onnx"]
    assert "| onnx |" in (exported["export_dir"] / "parity" / "1.md").read_text()


def test_the_saved_model_carries_the_threshold_only_when_given(exported, tiny_model, data_dir, tmp_path):
    loaded = tf.saved_model.load(str(exported["export_dir"] / "1"))
    assert loaded.match_threshold.numpy() == pytest.approx(0.42)
    report = export.export(tiny_model["model_dir"], str(tmp_path), formats=("saved_model",), dataset="folder",
                           data_dir=data_dir, latency_images=2)
    assert report["match_threshold"] is None
    assert not hasattr(tf.saved_model.load(str(tmp_path / "1")), "match_threshold")


@pytest.mark.parametrize("threshold", [1.5, -1.01, float("nan")])
def test_a_threshold_outside_minus_one_to_one_is_refused(tiny_model, data_dir, tmp_path, threshold):
    with pytest.raises(UserError, match=r"^--match_threshold must be a cosine similarity in \[-1, 1\]"):
        export_onnx(tiny_model, data_dir, tmp_path, match_threshold=threshold)
    with pytest.raises(UserError, match="--match_threshold"):
        ExportConfig(match_threshold=2.0)
    assert not os.listdir(tmp_path)


def test_an_onnx_folder_without_its_report_is_a_leftover(tmp_path):
    target = ExportDir(str(tmp_path))
    os.makedirs(target.onnx_dir(3))
    open(target.onnx_path(3), "wb").close()
    os.makedirs(os.path.join(tmp_path, "onnx", "4.partial-host-1-0123abcd"))
    assert target.taken_versions() == {3}
    assert target.remove_leftovers() == {3}
    assert os.listdir(tmp_path / "onnx") == []
    assert target.new_version(also_taken={3}) == 4


def test_a_version_failing_onnx_parity_leaves_only_its_report(tiny_model, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(parity.MIN_MEAN_COSINE, "onnx", 1.5)
    report = export_onnx(tiny_model, data_dir, tmp_path)
    assert report["published"] is False
    assert sorted(os.listdir(tmp_path)) == ["export.lock", "parity"]
    assert sorted(os.listdir(tmp_path / "parity")) == ["1.rejected.json", "1.rejected.md"]


def test_without_the_extra_onnx_is_refused_in_one_line(tiny_model, data_dir, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tf2onnx(name, *args, **kwargs):
        if name.split(".")[0] == "tf2onnx":
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tf2onnx)
    with pytest.raises(UserError, match=r"pip install 'pnpp_tf\[onnx\]'") as error:
        export_onnx(tiny_model, data_dir, tmp_path)
    assert "\n" not in str(error.value) and "tf2onnx is missing" in str(error.value)
    assert not os.listdir(tmp_path)

