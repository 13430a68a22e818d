"""pnpp_tf.export and pnpp_tf.serving.signatures: a small trained embedder exported for TF Serving and TFLite.

One export (module fixture) of a small_cnn embedder trained for a few steps; every test checks a
piece of it against the Keras embedder. Tests needing the `tflite` or `serving` extras skip
without them.
"""

import io
import json
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import make_folder_dataset
from full_disk import fill_leaving, listing, small_disk  # noqa: F401 - small_disk is a fixture
from pnpp_tf import export
from pnpp_tf.serving import signatures
from pnpp_tf.artifacts import ExportDir
from pnpp_tf.data import load_splits, pipeline
from pnpp_tf.io_utils import OutOfSpaceError
from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder
from pnpp_tf.modeling.optimizers import TorchAdam
from tf_serving_stand_in import predict_request, prediction_service, saved_model_cli

# Every test here but two reads one export of all the formats (about 10 s to make).
pytestmark = pytest.mark.slow

IMAGE_SIZE = 32
EMBEDDING_DIM = 16
MAX_PIXELS = 64 * 64  # the test images are 40 x 36; a 100 x 100 one is "too large"
MIN_MEAN_COSINE = {"float32": 0.9999, "float16": 0.999, "dynamic_int8": 0.98}


def _has(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data_dir = make_folder_dataset(root / "data")
    model_dir = root / "run"
    model_dir.mkdir()
    keras.utils.set_random_seed(0)
    embedder = build_embedder("small_cnn", IMAGE_SIZE, EMBEDDING_DIM)
    model = ProxyNCAModel(embedder, num_classes=4)
    model.compile(optimizer=TorchAdam(1e-3), proxy_optimizer=TorchAdam(10.0))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (32, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    model.fit(images, np.arange(32) % 4, batch_size=8, epochs=1, verbose=0)  # moves the BN statistics
    embedder.save(model_dir / "embedder.keras")
    flags = {"dataset": "folder", "data_dir": data_dir, "image_size": IMAGE_SIZE}
    (model_dir / "results.json").write_text(json.dumps({"flags": flags, "metrics": {"recall@1": 0.5}}))

    export_dir = root / "export"
    formats = export.FORMATS if _has("ai_edge_litert") else ("saved_model",)
    report = export.export(str(model_dir), str(export_dir), formats=formats, max_pixels=MAX_PIXELS,
                           representative_images=8, latency_images=3)
    test = load_splits("folder", data_dir)["test"]
    test_images = np.concatenate(list(pipeline.eval_dataset(test.paths, IMAGE_SIZE).as_numpy_iterator()))
    return {
        "root": root, "model_dir": model_dir, "export_dir": export_dir, "report": report,
        "embedder": embedder, "test_paths": test.paths, "test_images": test_images,
        "reference": signatures.normalized_embeddings(embedder, test_images).numpy(),
        "loaded": tf.saved_model.load(str(export_dir / "1")),
    }


def _file_bytes(paths):
    return [pathlib.Path(path).read_bytes() for path in paths]


def _encode(size, fmt):
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def test_saved_model_layout_and_float_signature(exported):
    version_dir = exported["export_dir"] / "1"
    assert (version_dir / "saved_model.pb").is_file() and (version_dir / "variables").is_dir()
    assert not [n for n in os.listdir(exported["export_dir"]) if "partial" in n]
    loaded = exported["loaded"]
    assert int(loaded.image_size.numpy()) == IMAGE_SIZE
    assert int(loaded.embedding_dim.numpy()) == EMBEDDING_DIM
    assert int(loaded.max_pixels.numpy()) == MAX_PIXELS
    signature = loaded.signatures["serving_default"]
    assert signature.structured_input_signature[1]["images"].shape.as_list() == [None, IMAGE_SIZE, IMAGE_SIZE, 3]
    embeddings = signature(images=tf.constant(exported["test_images"]))["embedding"].numpy()
    np.testing.assert_allclose(embeddings, exported["reference"], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_bytes_signature_decodes_as_evaluation_does(exported):
    # The test split mixes RGB PNG, JPEG, greyscale PNG and RGBA PNG files.
    encoded = tf.constant(_file_bytes(exported["test_paths"]))
    embeddings = exported["loaded"].signatures["serve_image_bytes"](image_bytes=encoded)["embedding"]
    np.testing.assert_allclose(embeddings.numpy(), exported["reference"], atol=1e-5)


def test_empty_batches_give_empty_embeddings(exported):
    signatures = exported["loaded"].signatures
    empty_images = signatures["serving_default"](images=tf.zeros([0, IMAGE_SIZE, IMAGE_SIZE, 3]))
    empty_bytes = signatures["serve_image_bytes"](image_bytes=tf.constant([], tf.string))
    assert empty_images["embedding"].shape == empty_bytes["embedding"].shape == (0, EMBEDDING_DIM)


def _png_claiming(width, height):
    """A real small PNG whose header is rewritten to claim width x height (its CRC no longer
    matches, so only a check made before decoding can report the size)."""
    data = bytearray(_encode((8, 8), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)


BAD_INPUTS = {
    "text": (lambda good: b"plain text, not an image", r"image_bytes\[1\] \(24 bytes\) is not a JPEG or PNG image"),
    "empty": (lambda good: b"", r"image_bytes\[1\] \(0 bytes\) is not a JPEG or PNG image"),
    "gif": (lambda good: _encode((8, 8), "GIF"), r"image_bytes\[1\] \(\d+ bytes\) is not a JPEG or PNG"),
    "truncated_jpeg": (lambda good: good["jpg"][: len(good["jpg"]) // 2], r"Invalid JPEG data"),
    "truncated_png": (lambda good: good["png"][: len(good["png"]) // 2], r"Invalid PNG data"),
    "cut_png_header": (lambda good: good["png"][:20], r"image_bytes\[1\]: the image header gives no positive width"),
    "large_jpeg": (lambda good: _encode((100, 100), "JPEG"),
                   rf"image_bytes\[1\] is 100x100 = 10000 pixels, more than max_pixels={MAX_PIXELS}"),
    "huge_png_header": (lambda good: _png_claiming(100_000, 100_000),
                        r"image_bytes\[1\] is 100000x100000 = 10000000000 pixels, more than max_pixels"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bytes_signature_rejects_bad_input_and_keeps_serving(exported, case):
    paths = exported["test_paths"][:2]
    assert [os.path.splitext(p)[1] for p in paths] == [".png", ".jpg"]
    good = dict(zip(("png", "jpg"), _file_bytes(paths)))
    make_bad, message = BAD_INPUTS[case]
    signature = exported["loaded"].signatures["serve_image_bytes"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        signature(image_bytes=tf.constant([good["png"], make_bad(good)]))
    after = signature(image_bytes=tf.constant([good["png"], good["jpg"]]))["embedding"].numpy()
    np.testing.assert_allclose(after, exported["reference"][:2], atol=1e-5)


def test_saved_model_cli_lists_both_signatures(exported):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    version_dir = str(exported["export_dir"] / "1")
    shown = subprocess.run([*saved_model_cli(), "show", "--dir", version_dir, "--all"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for name, inputs in (("serving_default", r"inputs\['images'\].*?dtype: DT_FLOAT.*?shape: \(-1, 32, 32, 3\)"),
                         ("serve_image_bytes", r"inputs\['image_bytes'\].*?dtype: DT_STRING.*?shape: \(-1\)")):
        block = re.search(rf"signature_def\['{name}'\]:(.*?)Method name is: (\S+)", shown.stdout, re.S)
        assert block and block.group(2) == "tensorflow/serving/predict", shown.stdout
        assert re.search(inputs, block.group(1), re.S) and "outputs['embedding']" in block.group(1)


def test_session_loader_runs_both_signatures(exported):
    # TF Serving's C++ loader runs the SavedModel's graph in a session, without Python objects or
    # pnpp_tf; TF's v1 loader does the same.
    feeds = {"serving_default": exported["test_images"], "serve_image_bytes": _file_bytes(exported["test_paths"])}
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(exported["export_dir"] / "1"))
        for name, value in feeds.items():
            signature = meta_graph.signature_def[name]
            (tensor_info,) = signature.inputs.values()
            embeddings = session.run(signature.outputs["embedding"].name, {tensor_info.name: value})
            np.testing.assert_allclose(embeddings, exported["reference"], atol=1e-5)


def test_grpc_predict_requests_for_both_signatures(exported):
    with prediction_service(exported["loaded"].signatures) as stub:
        for signature, key, value in (
            ("serving_default", "images", exported["test_images"][:3]),
            ("serve_image_bytes", "image_bytes", _file_bytes(exported["test_paths"][:3])),
        ):
            response = stub.Predict(predict_request("embedder", signature, {key: value}), timeout=60.0)
            embeddings = tf.make_ndarray(response.outputs["embedding"])
            np.testing.assert_allclose(embeddings, exported["reference"][:3], atol=1e-5)


@pytest.mark.parametrize("variant", export.TFLITE_VARIANTS)
def test_tflite_variants_match_keras(exported, variant):
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    path = exported["export_dir"] / "tflite" / "1" / f"embedder_{variant}.tflite"
    interpreter = litert.Interpreter(model_path=str(path))
    (details,) = interpreter.get_input_details()
    assert details["dtype"] == np.float32 and list(details["shape_signature"]) == [-1, IMAGE_SIZE, IMAGE_SIZE, 3]
    run = interpreter.get_signature_runner("serving_default")
    embeddings = np.stack([run(images=image[None])["embedding"][0] for image in exported["test_images"]])
    assert np.all(np.isfinite(embeddings))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    mean_cosine = float(np.mean(np.sum(embeddings * exported["reference"], axis=1)))
    row = {r["name"]: r for r in exported["report"]["variants"]}[f"tflite_{variant}"]
    assert row["mean_cosine"] == pytest.approx(mean_cosine, abs=1e-4)
    if variant in MIN_MEAN_COSINE:
        assert mean_cosine >= MIN_MEAN_COSINE[variant]
    else:
        assert row["min_mean_cosine"] is None and row["passed"] is None  # full_int8: reported


def test_parity_report_beside_the_export(exported):
    report_json = exported["export_dir"] / "parity" / "1.json"
    report = json.loads(report_json.read_text())
    names = [row["name"] for row in report["variants"]]
    expected = ["keras", "saved_model", "saved_model_bytes"]
    if _has("ai_edge_litert"):
        expected += [f"tflite_{v}" for v in export.TFLITE_VARIANTS]
    assert names == expected and report["passed"] is True
    assert report["eval_images"] == {"test": 12} and report["image_size"] == IMAGE_SIZE
    for row in report["variants"]:
        assert row["size_bytes"] > 0 and row["latency_ms"] > 0 and row["images_per_second"] > 0 and 0.0 <= row["recall@1"] <= 1.0
        assert row["max_abs_diff"] >= 0.0 and -1.0 <= row["min_cosine"] <= row["mean_cosine"] <= 1.0 + 1e-6
    assert report["variants"][0]["max_abs_diff"] == 0.0
    markdown = (exported["export_dir"] / "parity" / "1.md").read_text()
    assert "| variant | size | max abs diff | mean cosine |" in markdown
    assert all(f"| {name} |" in markdown for name in names)


def test_versions(tmp_path):
    assert ExportDir(str(tmp_path / "new")).new_version() == 1
    for name in ("1", "3", "notes", os.path.join("tflite", "4")):
        os.makedirs(tmp_path / name)
    os.makedirs(tmp_path / "parity")
    (tmp_path / "parity" / "5.json").write_text("{}")
    assert ExportDir(str(tmp_path)).new_version() == 6
    assert ExportDir(str(tmp_path)).new_version(2) == 2
    with pytest.raises(ValueError, match="Version 3 already exists.*version 6"):
        ExportDir(str(tmp_path)).new_version(3)
    with pytest.raises(ValueError, match="--version must be a positive integer, got 0"):
        ExportDir(str(tmp_path)).new_version(0)


def test_serving_module_refuses_what_it_cannot_serve():
    embedder = build_embedder("small_cnn", IMAGE_SIZE, EMBEDDING_DIM)
    with pytest.raises(ValueError, match="max_pixels=100 is smaller than one 32x32 input image"):
        signatures.EmbedderServingModule(embedder, max_pixels=100)
    inputs = keras.Input((32, 48, 3))
    wide = keras.Model(inputs, keras.layers.GlobalMaxPooling2D()(inputs))
    with pytest.raises(ValueError, match=r"square RGB images.*\(None, 32, 48, 3\)"):
        signatures.EmbedderServingModule(wide)


def run_export(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "pnpp_tf.export", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_cli_exports_a_new_version(exported):
    result = run_export(f"--model_dir={exported['model_dir']}", f"--export_dir={exported['export_dir']}",
                        "--format=saved_model", "--latency_images=2", f"--max_pixels={MAX_PIXELS}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (exported["export_dir"] / "2" / "saved_model.pb").is_file()
    report = json.loads((exported["export_dir"] / "parity" / "2.json").read_text())
    assert [row["name"] for row in report["variants"]] == ["keras", "saved_model", "saved_model_bytes"]
    assert "| saved_model_bytes |" in result.stdout


def test_an_export_with_an_index_answers_retrieve_as_the_catalogue_does(exported, tmp_path):
    from pnpp_tf.artifacts import load_embedder  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval.cataloguing import update_catalogue  # pylint: disable=import-outside-toplevel

    photos = os.path.dirname(exported["test_paths"][0])
    catalogue = update_catalogue(load_embedder(str(exported["model_dir"])), photos, str(tmp_path / "c.index"),
                                 shard_size=3, verbose=0).catalogue
    export_dir = tmp_path / "export"
    report = export.export(str(exported["model_dir"]), str(export_dir), formats=("saved_model",),
                           max_pixels=MAX_PIXELS, latency_images=2, index=catalogue.directory, retrieval_max_k=4)
    assert report["published"] and report["index"] == catalogue.directory
    retrieve = tf.saved_model.load(str(export_dir / "1")).signatures["retrieve"]
    queries = [path for path in exported["test_paths"] if os.path.dirname(path) == photos][:3]
    answer = retrieve(image_bytes=tf.constant([open(path, "rb").read() for path in queries]), k=tf.constant(4))
    distances, items, _ = catalogue.search(catalogue.unit_rows()[[catalogue.relative_paths().index(
        os.path.relpath(path, photos)) for path in queries]], k=4, backend="exact")
    ids = answer["ids"].numpy().astype(str)
    assert ids[:, 0].tolist() == [os.path.relpath(path, photos) for path in queries]  # each finds itself
    # Embedded in the graph, not read from the catalogue: the same lists up to float rounding.
    np.testing.assert_allclose(answer["distances"].numpy(), distances, atol=1e-5)
    with pytest.raises(ValueError, match="add saved_model to --format"):
        export.export(str(exported["model_dir"]), str(tmp_path / "e2"), formats=("tflite",),
                      index=catalogue.directory)


def test_export_errors_name_the_offending_value(exported, tmp_path):
    model_dir, export_dir = str(exported["model_dir"]), str(exported["export_dir"])
    with pytest.raises(ValueError, match=r"--format=tensorrt is not a non-empty subset of saved_model,tflite,onnx"):
        export.export(model_dir, export_dir, formats=["tensorrt"])
    with pytest.raises(ValueError, match=r"--tflite_variants=int4 is not a non-empty subset"):
        export.export(model_dir, export_dir, tflite_variants=["int4"])
    with pytest.raises(ValueError, match=r"--data_dir=.*nowhere does not exist"):
        export.export(model_dir, export_dir, data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"Version 1 already exists in --export_dir"):
        export.export(model_dir, export_dir, version=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "embedder.keras").write_bytes((exported["model_dir"] / "embedder.keras").read_bytes())
    with pytest.raises(ValueError, match="no results.json.*pass --dataset and --data_dir"):
        export.export(str(tmp_path / "run"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line(exported, tmp_path):
    result = run_export(f"--model_dir={tmp_path / 'nowhere'}", f"--export_dir={exported['export_dir']}")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("pnpp_tf.export: error:")]
    assert len(errors) == 1 and re.search(r"--model_dir=.*nowhere has no embedder.keras", errors[0])
    assert "Traceback" not in result.stderr


def _run_copy(exported, tmp_path, results=None, cut_embedder=False):
    """A model_dir like the trained one, with results.json replaced by `results` (text)."""
    run = tmp_path / "run"
    run.mkdir()
    embedder = (exported["model_dir"] / "embedder.keras").read_bytes()
    (run / "embedder.keras").write_bytes(embedder[:len(embedder) // 2] if cut_embedder else embedder)
    if results is not None:
        (run / "results.json").write_text(results)
    return run


@pytest.mark.parametrize("results, problem", [
    ('{"flags": {"dataset": "fol', r"results.json: this results.json of a training run is not valid JSON"),
    ("[1]", r"results.json: this results.json of a training run holds a JSON list, not an object"),
    ('{"flags": [1]}', r"results.json: its 'flags' is a JSON list, not an object"),
])
def test_an_unreadable_results_json_is_named(exported, tmp_path, results, problem):
    run = _run_copy(exported, tmp_path, results)
    with pytest.raises(ValueError, match=problem) as raised:
        export.export(str(run), str(tmp_path / "out"))
    assert str(raised.value).startswith(str(run / "results.json")) and "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_a_cut_short_embedder_is_named(exported, tmp_path):
    run = _run_copy(exported, tmp_path, cut_embedder=True)
    with pytest.raises(ValueError, match=rf"{re.escape(str(run / 'embedder.keras'))} is not a whole .keras "
                                         r"file \(\d+ bytes\): it may have been cut short"):
        export.export(str(run), str(tmp_path / "out"))


def test_a_saved_model_that_does_not_fit_leaves_no_version(exported, small_disk):
    export_dir = small_disk / "export"
    fill_leaving(small_disk, 1_000_000)
    with pytest.raises(OutOfSpaceError) as raised:
        export.export(str(exported["model_dir"]), str(export_dir), formats=["saved_model"], latency_images=2,
                      max_pixels=MAX_PIXELS)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{export_dir / '1'}: no space left on the device: "
                                                      "needs about 4.7 MB")
    assert listing(small_disk) == ["export", "export/export.lock"]  # no version, no temporary
    assert ExportDir(str(export_dir)).new_version() == 1


def test_cli_on_a_full_disk_is_one_line_and_leaves_no_partial_export(exported, small_disk):
    export_dir = small_disk / "export"
    fill_leaving(small_disk, 1_000_000)
    result = run_export(f"--model_dir={exported['model_dir']}", f"--export_dir={export_dir}",
                        "--format=saved_model", "--latency_images=2", f"--max_pixels={MAX_PIXELS}")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("pnpp_tf.export: error:")]
    assert len(errors) == 1 and f"{export_dir / '1'}: no space left on the device" in errors[0]
    assert "Traceback" not in result.stderr
    assert listing(export_dir) == ["export.lock"]
