"""pnpp_tf.artifacts: each way a model_dir or an export can be wrong is its own one-line error."""

import json
import re
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from pnpp_tf import artifacts, export
from pnpp_tf.serving import signatures
from pnpp_tf.artifacts import (CorruptArtifactError, ExportDir, ForeignArtifactError,
                               MissingArtifactError, ModelDir, SignatureError,
                               UnloadableArtifactError)
from pnpp_tf.errors import UserError
from pnpp_tf.modeling.model import build_embedder

IMAGE_SIZE = 32
IMAGES = np.random.default_rng(0).uniform(0, 255, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory holding a small_cnn embedder.keras, and its SavedModel export."""
    root = tmp_path_factory.mktemp("artifacts")
    keras.utils.set_random_seed(0)
    embedder = build_embedder("small_cnn", IMAGE_SIZE, 8, weights=None)
    (root / "run").mkdir()
    embedder.save(root / "run" / "embedder.keras")
    signatures.EmbedderServingModule(embedder).save(str(root / "export" / "3"))
    # A pnpp_tf SavedModel is published with its parity report (`pnpp_tf.artifacts.export_dir`).
    (root / "export" / "parity").mkdir()
    (root / "export" / "parity" / "3.json").write_text("{}")
    return root


def copy_run(trained, tmp_path, keras_bytes=None, results=None):
    run = tmp_path / "run"
    run.mkdir()
    whole = (trained / "run" / "embedder.keras").read_bytes()
    (run / "embedder.keras").write_bytes(whole if keras_bytes is None else keras_bytes(whole))
    if results is not None:
        (run / "results.json").write_text(results)
    return run


def assert_one_line(error, kind, pattern, cause=None):
    """`error` is exactly a `kind`, a UserError, one line matching `pattern`, and keeps `cause`."""
    assert type(error) is kind and isinstance(error, UserError)  # pylint: disable=unidiomatic-typecheck
    assert "\n" not in str(error) and re.search(pattern, str(error)), str(error)
    if cause is not None:
        assert isinstance(error.__cause__, cause), repr(error.__cause__)


@pytest.mark.slow
def test_each_loader_gives_the_same_embeddings(trained):
    keras_embedder = artifacts.load_embedder(str(trained / "run"))
    from_file = artifacts.load_keras_embedder(str(trained / "run" / "embedder.keras"))
    exported = artifacts.load_embedder(str(trained / "export"))  # the base path: its version 3
    assert (keras_embedder.kind, exported.kind) == ("keras", "saved_model")
    assert exported.source == str(trained / "export" / "3")
    assert keras_embedder.image_size == exported.image_size == IMAGE_SIZE
    assert keras_embedder.embedding_dim == exported.embedding_dim == 8
    reference = keras_embedder(IMAGES)
    np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(from_file(IMAGES), reference, atol=1e-6)
    np.testing.assert_allclose(exported(IMAGES), reference, atol=1e-5)
    # What evaluation embeds with: traceable, called like a Keras model.
    traced = tf.function(lambda images: exported.inference(images, training=False))
    np.testing.assert_allclose(traced(tf.constant(IMAGES)).numpy(), reference, atol=1e-5)


@pytest.mark.parametrize("load, pattern", [
    (lambda tmp: artifacts.load_model_dir_embedder(str(tmp)), r"^--model_dir=.* has no embedder.keras; train"),
    (lambda tmp: artifacts.load_embedder(str(tmp / "nothing")), r"^--model=.*nothing does not exist\.$"),
    (lambda tmp: artifacts.load_embedder(str(tmp)), r"^--model=.* has no embedder.keras .*no saved_model.pb"),
    (lambda tmp: artifacts.load_keras_model(str(tmp / "embedder.keras")), r"embedder.keras does not exist"),
    (lambda tmp: artifacts.load_saved_model_embedder(str(tmp)), r"^--saved_model=.* is not a SavedModel"),
])
def test_a_missing_artifact(tmp_path, load, pattern):
    (tmp_path / "7").mkdir()  # a version folder without saved_model.pb is no SavedModel
    with pytest.raises(MissingArtifactError) as raised:
        load(tmp_path)
    assert_one_line(raised.value, MissingArtifactError, pattern)


def test_a_cut_short_keras_file_and_a_file_of_another_kind(trained, tmp_path):
    run = copy_run(trained, tmp_path, keras_bytes=lambda whole: whole[:len(whole) // 2])
    with pytest.raises(CorruptArtifactError) as raised:
        artifacts.load_embedder(str(run))
    assert_one_line(raised.value, CorruptArtifactError,
                    rf"^{re.escape(str(run / 'embedder.keras'))} is not a whole .keras file \(\d+ bytes\)")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CorruptArtifactError) as raised:
        artifacts.load_embedder(str(tmp_path / "notes.txt"))
    assert_one_line(raised.value, CorruptArtifactError, r"is a file but not a .keras model")


def _rewrite_keras(whole, edit):
    """The .keras zip `whole` (bytes) with its members passed through `edit`({name: bytes})."""
    import io  # pylint: disable=import-outside-toplevel

    with zipfile.ZipFile(io.BytesIO(whole)) as source:
        members = edit({name: source.read(name) for name in source.namelist()})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for name, data in members.items():
            target.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("edit, cause", [
    (lambda members: {"notes.txt": b"a zip, but not a model"}, KeyError),
    (lambda members: dict(members, **{"config.json": members["config.json"].replace(
        b'"Functional"', b'"NoSuchModel"')}), ValueError),
])
def test_a_whole_keras_file_keras_cannot_load_keeps_its_cause(trained, tmp_path, edit, cause):
    run = copy_run(trained, tmp_path, keras_bytes=lambda whole: _rewrite_keras(whole, edit))
    with pytest.raises(UnloadableArtifactError) as raised:
        artifacts.load_model_dir_embedder(str(run))
    assert_one_line(raised.value, UnloadableArtifactError,
                    rf"^{re.escape(str(run / 'embedder.keras'))} could not be loaded \({cause.__name__}: ",
                    cause=cause)


def test_a_cut_short_saved_model_keeps_its_cause(trained, tmp_path):
    version = tmp_path / "export" / "1"
    version.parent.mkdir()
    tf.io.gfile.copy(str(trained / "export" / "3" / "saved_model.pb"), str(tmp_path / "whole.pb"))
    whole = (tmp_path / "whole.pb").read_bytes()
    version.mkdir()
    (version / "saved_model.pb").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UnloadableArtifactError) as raised:
        artifacts.load_saved_model_embedder(str(tmp_path / "export"))
    assert_one_line(raised.value, UnloadableArtifactError,
                    rf"^--saved_model={re.escape(str(version))} could not be loaded \(OSError: ", cause=OSError)


def _save_module(path, function, spec, signature="serving_default"):
    module = tf.Module()
    module.serve = tf.function(function, input_signature=[spec])
    tf.saved_model.save(module, str(path), signatures={signature: module.serve})
    return str(path)


@pytest.mark.parametrize("make, pattern", [
    (lambda tmp: _save_module(tmp / "other", lambda x: {"embedding": x}, tf.TensorSpec([None, 8, 8, 3]),
                              signature="other"),
     r"has no 'serving_default' signature \(it has \['other'\]\)"),
    (lambda tmp: _save_module(tmp / "features", lambda x: {"features": tf.reduce_mean(x, [1, 2])},
                              tf.TensorSpec([None, 8, 8, 3])),
     r"has no output named 'embedding' \(it has \['features'\]\)"),
    (lambda tmp: _save_module(tmp / "vector", lambda x: {"embedding": x}, tf.TensorSpec([None, 8])),
     r"must take one float32 image batch \[N, S, S, 3\]"),
    (lambda tmp: _save_module(tmp / "wide", lambda x: {"embedding": tf.reduce_mean(x, [1, 2])},
                              tf.TensorSpec([None, 8, 12, 3])),
     r"does not take square RGB images \[N, S, S, 3\]; its input shape is \(None, 8, 12, 3\)"),
])
def test_a_saved_model_with_the_wrong_signature(tmp_path, make, pattern):
    with pytest.raises(SignatureError) as raised:
        artifacts.load_embedder(make(tmp_path))
    assert_one_line(raised.value, SignatureError, pattern)


def test_one_input_size_rule_for_keras_and_saved_models(tmp_path):
    """Square: that size. Any size: the caller's, else an error. Anything else: an error."""
    inputs = keras.Input((IMAGE_SIZE, 48, 3))
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs)).save(tmp_path / "wide.keras")
    with pytest.raises(SignatureError) as raised:
        artifacts.load_embedder(str(tmp_path / "wide.keras"), image_size=IMAGE_SIZE)
    assert_one_line(raised.value, SignatureError, r"does not take square RGB images .*\(None, 32, 48, 3\)")

    inputs = keras.Input((None, None, 3))
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs)).save(tmp_path / "any.keras")
    any_size = _save_module(tmp_path / "any", lambda x: {"embedding": tf.reduce_mean(x, [1, 2])},
                            tf.TensorSpec([None, None, None, 3]))
    for model in (str(tmp_path / "any.keras"), any_size):
        with pytest.raises(SignatureError) as raised:
            artifacts.load_embedder(model)
        assert_one_line(raised.value, SignatureError, r"takes images of any size and records none")
        assert artifacts.load_embedder(model, image_size=40).image_size == 40


@pytest.mark.parametrize("text, pattern", [
    ('{"flags": {"dataset": "fol', r"this results.json of a training run is not valid JSON"),
    ("[1]", r"this results.json of a training run holds a JSON list, not an object"),
    ('{"flags": [1]}', r"its 'flags' is a JSON list, not an object"),
    ('{"history": "loss"}', r"its 'history' is a JSON str, not an object"),
    ('{"metrics": {}}', r"no 'flags' object, which pnpp_tf.train writes; restore the file or choose "
                        r"another --model_dir\.$"),
])
def test_a_damaged_results_json(tmp_path, text, pattern):
    (tmp_path / "results.json").write_text(text)
    with pytest.raises(CorruptArtifactError) as raised:
        ModelDir(str(tmp_path)).read_results(required=("flags",))
    assert_one_line(raised.value, CorruptArtifactError, rf"^{re.escape(str(tmp_path / 'results.json'))}: {pattern}")


def test_results_json_sections_and_a_run_without_one(tmp_path):
    run = ModelDir(str(tmp_path))
    assert run.read_results() is None
    (tmp_path / "results.json").write_text(json.dumps(
        {"flags": {"dataset": "folder"}, "metrics": {"recall@1": 0.5}, "history": None, "other": 1}))
    results = run.read_results(required=("flags", "metrics"))
    assert (results.flags, results.metrics, results.history) == ({"dataset": "folder"}, {"recall@1": 0.5}, {})
    assert results.data["other"] == 1 and results.path == run.results_path


def test_results_json_of_another_run(trained, tmp_path):
    run = copy_run(trained, tmp_path, results=json.dumps({"flags": {"image_size": 64, "dataset": "folder",
                                                                    "data_dir": str(tmp_path)}}))
    with pytest.raises(ForeignArtifactError) as raised:
        export.export(str(run), str(tmp_path / "out"), formats=["saved_model"])
    assert_one_line(raised.value, ForeignArtifactError,
                    rf"^{re.escape(str(run / 'results.json'))} says image_size=64 but .*embedder.keras takes "
                    r"32-pixel images; is results.json from another run\?$")
    assert not (tmp_path / "out").exists()


def test_the_dataset_of_a_run(tmp_path):
    run = ModelDir(str(tmp_path), "--model")
    with pytest.raises(UserError, match=r"^No dataset known for --model=.* pass --dataset and --data_dir\.$"):
        run.dataset()
    (tmp_path / "results.json").write_text(json.dumps({"flags": {"dataset": "folder", "data_dir": str(tmp_path)}}))
    assert run.dataset() == ("folder", str(tmp_path))
    (tmp_path / "moved").mkdir()
    assert run.dataset(data_dir=str(tmp_path / "moved")) == ("folder", str(tmp_path / "moved"))
    with pytest.raises(UserError, match=r"^--data_dir=.*elsewhere does not exist"):
        run.dataset(data_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match=r"^Unknown --dataset='imagenet'"):
        run.dataset(dataset="imagenet")


def test_export_directory_versions_as_tf_serving_picks_them(tmp_path):
    target = ExportDir(str(tmp_path / "export"))
    assert target.saved_model_versions() == [] and target.new_version() == 1
    for version in (2, 10):
        (tmp_path / "export" / str(version)).mkdir(parents=True)
        (tmp_path / "export" / str(version) / "saved_model.pb").write_bytes(b"")
    (tmp_path / "export" / "11").mkdir()  # being written: not served, but taken
    assert target.saved_model_versions() == [2, 10]
    assert target.new_version() == 12
    assert target.tflite_path(12, "float16").endswith("export/tflite/12/embedder_float16.tflite")
    assert target.parity_stem(12).endswith("export/parity/12")
    assert target.served_path() == target.version_path(10)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"--export_dir=.*file is a file, not a directory"):
        ExportDir(str(tmp_path / "file")).new_version()
