"""An export version is visible only once whole and past parity; what killed exports leave is
never served, and the next export removes it (only when its writer is gone).

Real processes for the kill and concurrency cases: a child runs `pnpp_tf.export` as `python -m`
does, after test-only code that stops it at the moment to kill (tests/export_child.py); no
hook in the library.
"""

import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from tensorflow.core.protobuf import saved_model_pb2

from cli_helpers import REPO, run_python
from conftest import make_folder_dataset
from pnpp_tf import artifacts, export, flags, index, io_utils
from pnpp_tf.serving import parity, signatures
from pnpp_tf.artifacts import ExportDir, MissingArtifactError
from pnpp_tf.catalogue_config import IndexConfig
from pnpp_tf.config import ExportConfig
from pnpp_tf.modeling.model import build_embedder

TESTS = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(TESTS, "export_child.py")
IMAGE_SIZE = 32
HAS_LITERT = importlib.util.find_spec("ai_edge_litert") is not None
FORMATS = ("saved_model", "tflite") if HAS_LITERT else ("saved_model",)
CHEAP = ("--tflite_variants=float32", "--latency_images=2", f"--format={','.join(FORMATS)}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's directory: an untrained small_cnn embedder.keras and its results.json."""
    root = tmp_path_factory.mktemp("publishing")
    data_dir = make_folder_dataset(root / "data")
    (root / "run").mkdir()
    build_embedder("small_cnn", IMAGE_SIZE, 8, weights=None).save(root / "run" / "embedder.keras")
    flags = {"dataset": "folder", "data_dir": data_dir, "image_size": IMAGE_SIZE}
    (root / "run" / "results.json").write_text(json.dumps({"flags": flags, "metrics": {}}))
    return root / "run"


def export_here(run_dir, export_dir, **kwargs):
    return export.export(str(run_dir), str(export_dir), formats=FORMATS, tflite_variants=("float32",),
                         latency_images=2, **kwargs)


def listing(folder):
    """Every file and folder under `folder`, relative, sorted; a SavedModel's insides left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        if artifacts.is_saved_model(root):
            dirs[:] = []
            continue
        found += [os.path.relpath(os.path.join(root, name), folder) for name in dirs + files]
    return sorted(found)


def published(version, formats=FORMATS):
    """What `listing` shows of a published version."""
    names = [str(version), "parity", f"parity/{version}.json", f"parity/{version}.md"]
    if "tflite" in formats:
        names += ["tflite", f"tflite/{version}", f"tflite/{version}/embedder_float32.tflite"]
    return names


def partials(folder):
    return [name for name in listing(folder) if io_utils.is_temporary_name(name)]


def start_child(export_dir, run_dir, stop, *args):
    """`python -m pnpp_tf.export` in a child that `stop`s (see export_child.py); Popen."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, CHILD, stop, f"--model_dir={run_dir}", f"--export_dir={export_dir}",
                             *CHEAP, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error_line(result, status):
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("pnpp_tf.export: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


class LogLines(logging.Handler):
    """absl's log lines, while installed (`with LogLines() as lines:`)."""

    def __enter__(self):
        self.lines = []
        self.logger = logging.getLogger("absl")
        self.saved_level = self.logger.level  # not `level`: a Handler's own threshold
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        return self.lines

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __exit__(self, *exc_info):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved_level)


# --- Which versions readers see, and which leftovers an export removes (no export run) -------

def saved_model_proto(path, signatures):
    """A stand-in SavedModel (saved_model.pb only) with `signatures`, enough for ExportDir."""
    proto = saved_model_pb2.SavedModel()
    graph = proto.meta_graphs.add()
    for name in signatures:
        graph.signature_def[name].method_name = "tensorflow/serving/predict"
    os.makedirs(path)
    with open(os.path.join(path, "saved_model.pb"), "wb") as file:
        file.write(proto.SerializeToString())


def write(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


def test_readers_pass_over_unpublished_versions_and_leftovers_are_removed(tmp_path):
    ours = [signatures.IMAGES_SIGNATURE, signatures.BYTES_SIGNATURE]
    report = json.dumps({"variants": [{"name": "keras"}, {"name": "saved_model"}]})
    saved_model_proto(tmp_path / "1", ours)                     # published
    write(tmp_path / "parity" / "1.json", report)
    write(tmp_path / "parity" / "1.md")
    write(tmp_path / "tflite" / "1" / "embedder_float32.tflite")
    saved_model_proto(tmp_path / "2", ours)                     # killed by an export of before: no report
    write(tmp_path / "tflite" / "2" / "embedder_float32.tflite")
    saved_model_proto(tmp_path / "3.partial-host-12-0123abcd", ours)  # killed before its SavedModel
    write(tmp_path / "parity" / "3.json", report)
    write(tmp_path / "parity" / "3.md")
    write(tmp_path / "tflite" / "3" / "embedder_float32.tflite")
    write(tmp_path / "tflite" / "4" / "embedder_float32.tflite")  # killed before its report
    write(tmp_path / "parity" / "5.md")
    write(tmp_path / "parity" / "6.rejected.json", report)      # failed parity: only its report
    write(tmp_path / "parity" / "6.rejected.md")
    saved_model_proto(tmp_path / "7", [signatures.IMAGES_SIGNATURE])  # another tool's: no report to wait for
    (tmp_path / "8").mkdir()                                     # no SavedModel
    write(tmp_path / "tflite" / "9.partial-host-12-89abcdef" / "embedder_float32.tflite")
    write(tmp_path / "parity" / "9.json.partial-host-12-aaaaaaaa")
    write(tmp_path / "1.partial-notes")                          # not a temporary name
    target = ExportDir(str(tmp_path))

    assert target.saved_model_versions() == [1, 7]
    with LogLines() as lines:
        assert target.served_path() == str(tmp_path / "7")
    assert not any("Passing over" in line for line in lines)  # version 2 is below the one used
    assert target.remove_leftovers() == {2, 3, 4, 5}
    assert listing(tmp_path) == ["1", "1.partial-notes", "7", "8", "parity", "parity/1.json", "parity/1.md",
                                 "parity/6.rejected.json", "parity/6.rejected.md", "tflite", "tflite/1",
                                 "tflite/1/embedder_float32.tflite"]
    assert target.new_version(also_taken={2, 3, 4, 5}) == 9
    assert target.new_version(2) == 2  # removed: free again when asked for
    with pytest.raises(ValueError, match="Version 6 already exists"):
        target.new_version(6)


def test_a_base_directory_with_only_unpublished_versions_is_one_line(tmp_path):
    saved_model_proto(tmp_path / "2", [signatures.IMAGES_SIGNATURE, signatures.BYTES_SIGNATURE])
    with LogLines() as lines, pytest.raises(MissingArtifactError) as raised:
        artifacts.load_saved_model_embedder(str(tmp_path), "--saved_model")
    assert str(raised.value) == (
        f"--saved_model={tmp_path} has no published version (version 2: its SavedModel has no parity report "
        "parity/2.json, so it never passed the parity check). Export again "
        "(pnpp_tf.export removes such leftovers), or name a version directory.")
    assert any(line.startswith(f"Passing over version 2 of the export {tmp_path}: its SavedModel has no parity")
               for line in lines)
    with pytest.raises(MissingArtifactError, match="has no published version"):
        artifacts.load_embedder(str(tmp_path))  # index --model=<export_dir>


# --- Real exports ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_version_is_published_whole_its_saved_model_last(run_dir, tmp_path, monkeypatch):
    order = []
    publish = io_utils.Staged.publish

    def recording(self):
        if not io_utils.is_temporary_name(os.path.dirname(self.path)):  # not a file inside a part
            order.append(os.path.relpath(self.path, tmp_path / "export"))
        publish(self)

    monkeypatch.setattr(io_utils.Staged, "publish", recording)
    report = export_here(run_dir, tmp_path / "export")
    expected = (["tflite/1"] if HAS_LITERT else []) + ["parity/1.md", "parity/1.json", "1"]
    assert order == expected
    assert report["published"] is True and report["passed"] is True and report["formats"] == list(FORMATS)
    assert listing(tmp_path / "export") == sorted(published(1) + ["export.lock"])
    on_disk = json.loads((tmp_path / "export" / "parity" / "1.json").read_text())
    assert {row["path"] for row in on_disk["variants"][1:3]} == {str(tmp_path / "export" / "1")}
    assert (tmp_path / "export" / "export.lock").read_text() == ""  # released
    assert ExportDir(str(tmp_path / "export")).served_path() == str(tmp_path / "export" / "1")


@pytest.mark.slow
def test_a_version_that_fails_parity_leaves_only_its_report(run_dir, tmp_path):
    export_dir = tmp_path / "export"
    result = run_python(CHILD, "fail_parity", f"--model_dir={run_dir}", f"--export_dir={export_dir}", *CHEAP)
    assert re.fullmatch(
        r"pnpp_tf\.export: error: parity check failed: saved_model mean cosine [01]\.\d{6} < 1\.5; version 1 was "
        rf"not published \(report: {re.escape(str(export_dir / 'parity' / '1.rejected.md'))}\); pass "
        r"--publish_on_parity_failure to publish it all the same\.", one_error_line(result, 1))
    assert "| saved_model |" in result.stdout and "**Not published:**" in result.stdout
    assert listing(export_dir) == ["export.lock", "parity", "parity/1.rejected.json", "parity/1.rejected.md"]
    rejected = json.loads((export_dir / "parity" / "1.rejected.json").read_text())
    assert rejected["published"] is False and rejected["passed"] is False
    target = ExportDir(str(export_dir))
    assert target.saved_model_versions() == [] and target.new_version() == 2


@pytest.mark.slow
def test_publish_on_parity_failure_publishes_and_still_fails(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(parity.MIN_MEAN_COSINE, "saved_model", 1.5)
    config = ExportConfig(model_dir=str(run_dir), export_dir=str(tmp_path / "export"), format=FORMATS,
                          tflite_variants=("float32",), latency_images=2, publish_on_parity_failure=True)
    assert flags.parse(ExportConfig, ["pnpp_tf.export", "--publish_on_parity_failure"]).publish_on_parity_failure
    assert export.main(config) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].endswith("version 1 was published all the same (--publish_on_parity_failure).")
    assert listing(tmp_path / "export") == sorted(published(1) + ["export.lock"])
    report = json.loads((tmp_path / "export" / "parity" / "1.json").read_text())
    assert report["published"] is True and report["passed"] is False
    assert "Published although a variant failed" in (tmp_path / "export" / "parity" / "1.md").read_text()


def wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_an_export_killed_before_publishing_shows_nothing_and_the_next_cleans_up(run_dir, tmp_path):
    export_dir = tmp_path / "export"
    child = start_child(export_dir, run_dir, "wait_after_parity")
    try:
        wait_for(tmp_path / "export.measured", child)  # parity measured on the written parts, none published
    finally:
        child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    left = partials(export_dir)
    assert len(left) == (2 if HAS_LITERT else 1) and left[0].startswith("1.partial-")
    assert not [name for name in listing(export_dir) if name in ("1", "tflite/1") or name.startswith("parity")]
    with pytest.raises(MissingArtifactError, match=r"no saved_model.pb \(an exported version\)"):
        artifacts.load_embedder(str(export_dir))  # index --model=<export_dir>
    with pytest.raises(MissingArtifactError, match=r"is not a SavedModel directory"):
        artifacts.load_saved_model_embedder(str(export_dir))  # evaluate --saved_model=<export_dir>

    result = run_python("-m", "pnpp_tf.export", f"--model_dir={run_dir}", f"--export_dir={export_dir}", *CHEAP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert listing(export_dir) == sorted(published(1) + ["export.lock"])
    assert f"Removed {export_dir / left[0]}, left by an export that did not finish." in result.stderr


@pytest.mark.slow
def test_an_export_killed_between_its_report_and_its_saved_model(run_dir, tmp_path):
    export_dir = tmp_path / "export"
    child = start_child(export_dir, run_dir, "die_before_saved_model")
    _, stderr = child.communicate(timeout=600)
    assert child.returncode == -signal.SIGKILL, stderr[-3000:]
    assert (export_dir / "parity" / "1.json").is_file() and not (export_dir / "1").exists()
    assert [name.split(".partial-")[0] for name in partials(export_dir)] == ["1"]
    assert ExportDir(str(export_dir)).saved_model_versions() == []

    with LogLines() as lines:
        report = export_here(run_dir, export_dir)
    assert report["version"] == 2  # a number once published in part is not reused
    assert listing(export_dir) == sorted(published(2) + ["export.lock"])
    assert any("Removed" in line and "parity/1.json, a part of version 1, which was never published" in line
               for line in lines)


@pytest.mark.slow
def test_an_incomplete_version_from_an_older_export_is_passed_over_then_removed(run_dir, tmp_path):
    # What an export killed after its SavedModel and before its report left, when the SavedModel
    # was published first: 2/ beside a half-filled tflite/2/ and no parity/2.json.
    export_dir = tmp_path / "export"
    export_here(run_dir, export_dir)
    module = signatures.EmbedderServingModule(artifacts.load_keras_model(str(run_dir / "embedder.keras")))
    module.save(str(export_dir / "2"))
    write(export_dir / "tflite" / "2" / "embedder_float32.tflite", "half")
    images = make_folder_dataset(tmp_path / "images")

    with LogLines() as lines:
        built = index.run(IndexConfig(model=str(export_dir), images=images, index=str(tmp_path / "photos.index"),
                                      progress=False))
    assert built.catalogue.manifest["model"] == str(export_dir / "1")
    assert any(f"Passing over version 2 of the export {export_dir}" in line for line in lines)
    assert any(f"Using version 1 of the export {export_dir}" in line for line in lines)

    report = export_here(run_dir, export_dir)
    assert report["version"] == 3  # TF Serving may have loaded 2: it serves a number once
    assert listing(export_dir) == sorted(set(published(1) + published(3) + ["export.lock"]))


@pytest.mark.slow
def test_a_second_export_at_once_stops_and_removes_nothing(run_dir, tmp_path):
    export_dir = tmp_path / "export"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pnpp_tf.run_lock import RunLock; "
         "lock = RunLock(sys.argv[1], '--export_dir', 'export.lock', 'export').acquire(); "
         "print('held', flush=True); time.sleep(600)", str(export_dir)],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n", holder.communicate()[1][-3000:]
        record = json.loads((export_dir / "export.lock").read_text())
        leftover = export_dir / f"1.partial-{record['host']}-{holder.pid}-0123abcd"
        leftover.mkdir()  # the holder's, being written
        result = run_python("-m", "pnpp_tf.export", f"--model_dir={run_dir}", f"--export_dir={export_dir}",
                            *CHEAP)
    finally:
        holder.kill()
        holder.communicate()
    assert one_error_line(result, 2) == (
        f"pnpp_tf.export: error: --export_dir={export_dir} is in use by another export (pid {holder.pid} on host "
        f"{record['host']}, started {record['started']}); wait for it to finish or choose another --export_dir.")
    assert listing(export_dir) == ["1.partial-" + leftover.name.split(".partial-")[1], "export.lock"]
