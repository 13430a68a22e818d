"""Embedding a catalogue with Apache Beam (`pnpp_tf.retrieval.beam`) equals embedding it in process."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam")

from cli_helpers import REPO  # noqa: E402
from conftest import make_folder_dataset  # noqa: E402
from pnpp_tf.artifacts import load_embedder  # noqa: E402
from pnpp_tf.errors import UserError  # noqa: E402
from pnpp_tf.retrieval import beam as beam_lib  # noqa: E402
from pnpp_tf.retrieval import catalogue as catalogue_lib  # noqa: E402
from pnpp_tf.retrieval.cataloguing import update_catalogue  # noqa: E402
from pnpp_tf.retrieval.shards import Shard  # noqa: E402

IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
MULTI_PROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """Conftest's tiny model, a folder of 12 images plus one unreadable file, and its in-process catalogue."""
    root = tmp_path_factory.mktemp("beam")
    photos = make_folder_dataset(root / "photos", train_classes=2, test_classes=1, images_per_class=4)
    with open(os.path.join(photos, "test", "broken.jpg"), "wb") as file:
        file.write(b"not a JPEG at all")
    with open(os.path.join(photos, "notes.txt"), "w") as file:  # not an image: not matched
        file.write("hello")
    reference = str(root / "reference.index")
    update_catalogue(tiny_model["embedder"], photos, reference, shard_size=5, batch_size=4, verbose=0)
    return {"root": root, "model": tiny_model["model_dir"], "photos": photos, "embedder": tiny_model["embedder"],
            "reference": reference}


def contents(index):
    """(keys, float32 rows, manifest's skipped) of a catalogue, rows in key order."""
    manifest = catalogue_lib.read_manifest(index)
    keys, rows = [], []
    for entry in manifest["shards"]:
        shard = Shard.open(os.path.join(index, entry["name"]))
        keys += shard.keys()
        rows.append(shard.decoded())
    rows = np.concatenate(rows)
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    return [tuple(keys[i]) for i in order], rows[order], sorted(map(list, manifest["skipped"]))


def assert_same_catalogue(index, reference):
    keys, rows, skipped = contents(index)
    want_keys, want_rows, want_skipped = contents(reference)
    assert keys == want_keys
    np.testing.assert_allclose(rows, want_rows, atol=1e-5)
    assert skipped == want_skipped and len(skipped) == 1 and skipped[0][0] == os.path.join("test", "broken.jpg")


def pipeline_then_ingest(setup, images, tmp_path, pipeline_args=IN_MEMORY):
    """Runs the pipeline on `images` into tmp_path/out.beam (4 files a call, batches of 4), which must
    embed the 12 images and skip the broken one, then ingests that into the new catalogue
    tmp_path/beam.index, which must equal the in-process one. Returns (the summary, the index)."""
    output = str(tmp_path / "out.beam")
    summary = beam_lib.embed_catalogue_pipeline(images, output, setup["model"], pipeline_args=pipeline_args,
                                                batch_size=4, files_per_call=4)
    assert (summary["embedded"], summary["skipped"]) == (12, 1)
    index = str(tmp_path / "beam.index")
    beam_lib.ingest_embeddings(output, index, embedder=setup["embedder"], verbose=0)
    assert_same_catalogue(index, setup["reference"])
    return summary, index


def test_handler_embeds_and_skips_as_embed_files(setup):
    handler = beam_lib.EmbedderModelHandler(setup["model"], batch_size=4)
    model = handler.load_model()
    paths = sorted(glob.glob(os.path.join(setup["photos"], "test", "*", "*"))) + \
        [os.path.join(setup["photos"], "test", "broken.jpg")]
    batch = [(path, os.path.relpath(path, setup["photos"]), 1, 2) for path in paths]
    results = list(handler.run_inference(batch, model))
    found = setup["embedder"].embed_files(paths, on_bad_image="skip")
    assert [r[0] for r in results] == [b[1] for b in batch] and len(results) == len(paths)
    np.testing.assert_allclose(np.stack([r[3] for r in results[:-1]]), found.embeddings, atol=1e-5)
    assert results[-1][3] is None and results[-1][4] == dict(found.skipped)[paths[-1]]
    assert handler.batch_elements_kwargs()["max_batch_size"] == 64  # 16 batches per embed_files call


def test_pipeline_then_ingest_equals_the_in_process_index(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(setup["root"])  # a relative --images: keys relative to the folder all the same
    _, index = pipeline_then_ingest(setup, "photos", tmp_path)
    output = str(tmp_path / "out.beam")
    # The ingested catalogue is one update_catalogue knows: nothing is embedded again.
    report = update_catalogue(setup["embedder"], setup["photos"], index, verbose=0)
    assert (report.added, report.removed, report.kept) == (0, 0, 12)
    with pytest.raises(UserError, match="is a catalogue already"):
        beam_lib.ingest_embeddings(output, index, embedder=setup["embedder"])


def test_killed_and_restarted_pipeline_is_complete_without_duplicates(setup, tmp_path):
    output = str(tmp_path / "out.beam")
    beam_lib.embed_catalogue_pipeline(setup["photos"], output, setup["model"], pipeline_args=IN_MEMORY, batch_size=4,
                                      files_per_call=4)
    parts = sorted(glob.glob(os.path.join(output, "part-*.npz")))
    assert len(parts) >= 2
    # A crash: one part never written, another half-written under its temporary name, and a part of
    # a retried bundle grouped otherwise (its files are in another part too).
    lost = parts[0]
    with open(lost, "rb") as file:
        data = file.read()
    os.remove(lost)
    with open(lost + ".partial-123-deadbeef", "wb") as file:
        file.write(data[:len(data) // 2])
    shutil.copy(parts[1], os.path.join(output, "part-0000retried.npz"))
    embedded, skipped = beam_lib.read_output(output)
    assert len(embedded) + len(skipped) < 13  # incomplete, yet each file once
    pipeline_then_ingest(setup, setup["photos"], tmp_path)


def test_changed_during_run_is_the_embed_reason():
    from pnpp_tf.retrieval.embed import CHANGED_DURING_RUN
    assert beam_lib._CHANGED_DURING_RUN == CHANGED_DURING_RUN


def test_copy_model_through_beam_filesystems(setup, tmp_path):
    """What a worker does with a --model on gs:// (here a local path through the same code)."""
    copy = beam_lib.copy_model(setup["model"], str(tmp_path / "copy"))
    assert sorted(os.listdir(copy)) == ["embedder.keras"]
    assert load_embedder(copy).embedding_dim == setup["embedder"].embedding_dim
    single = beam_lib.copy_model(os.path.join(setup["model"], "embedder.keras"), str(tmp_path / "file"))
    assert single == str(tmp_path / "file" / "embedder.keras") and os.path.isfile(single)


def test_output_of_other_images_or_model_is_refused(setup, tmp_path):
    output = str(tmp_path / "out.beam")
    os.makedirs(output)
    with open(os.path.join(output, beam_lib.PIPELINE_FILE), "w") as file:
        file.write('{"images_root": "/elsewhere", "model": "m", "max_pixels": 1}')
    with pytest.raises(UserError, match="another images_root"):
        beam_lib.embed_catalogue_pipeline(setup["photos"], output, setup["model"], pipeline_args=IN_MEMORY)
    with pytest.raises(UserError, match="not one of"):
        beam_lib.beam_options("LocalRunner")


@pytest.mark.slow
def test_sigkilled_pipeline_resumes_complete(setup, tmp_path):
    """A pipeline SIGKILLed once its first part is written, run again: complete, each file once."""
    output = str(tmp_path / "out.beam")
    script = ("import sys; from pnpp_tf.retrieval import beam as b; "
              "b.embed_catalogue_pipeline(sys.argv[1], sys.argv[2], sys.argv[3], pipeline_args=sys.argv[4:], "
              "batch_size=1, files_per_call=1)")
    child = subprocess.Popen([sys.executable, "-c", script, setup["photos"], output, setup["model"], *IN_MEMORY],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not glob.glob(os.path.join(output, "part-*.npz")) and child.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    embedded, skipped = beam_lib.read_output(output)
    assert 0 < len(embedded) + len(skipped) < 13, "the kill came after the pipeline had finished"
    summary, _ = pipeline_then_ingest(setup, setup["photos"], tmp_path)
    assert summary["new"] == 12 - len(embedded)


@pytest.mark.slow
def test_two_worker_processes_give_the_in_process_index(setup, tmp_path):
    pipeline_then_ingest(setup, setup["photos"], tmp_path, pipeline_args=MULTI_PROCESS)


@pytest.mark.slow
def test_index_command_with_direct_runner(setup, tmp_path):
    index = str(tmp_path / "cli.index")
    run = subprocess.run([sys.executable, "-m", "pnpp_tf.index", f"--model={setup['model']}",
                          f"--images={setup['photos']}", f"--index={index}", "--runner=DirectRunner",
                          "--batch_size=4", "--noprogress"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Indexed 12 images" in run.stdout and "broken.jpg" in run.stdout
    assert os.path.isfile(os.path.join(index + ".beam", beam_lib.SKIPPED_FILE))
    assert_same_catalogue(index, setup["reference"])
