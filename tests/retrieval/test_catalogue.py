"""pnpp_tf.retrieval.cataloguing: a catalogue index's incremental update, its resumption after a
kill, its structures, and its one-line errors (the shards and search: test_catalogue_search.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from catalogue_testing import (CHILD, EMBEDDING_DIM, IMAGE_SIZE, child_env, import_ann, one_line, photos_folder,
                               readable_images, rows_by_path)
from conftest import write_image
from pnpp_tf.artifacts import load_embedder
from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import write_json
from pnpp_tf.modeling.model import build_embedder
from pnpp_tf.retrieval import catalogue as catalogue_lib
from pnpp_tf.retrieval import cataloguing
from pnpp_tf.retrieval.catalogue import Catalogue
from pnpp_tf.retrieval.cataloguing import update_catalogue
from pnpp_tf.run_lock import RunLock



@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory):
    """A float32 catalogue of 12 images in 3 shards, built once; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("built")
    photos = photos_folder(root / "photos", seed=5)
    update_catalogue(tiny_model["embedder"], photos, str(root / "photos.index"), shard_size=5, verbose=0)
    return {"photos": photos, "index": str(root / "photos.index")}


def copied(source, tmp_path):
    """A copy of the catalogue of `source` (the `built` fixture) in `tmp_path`."""
    index = str(tmp_path / "photos.index")
    shutil.copytree(source["index"], index)
    return index


class EmbedSpy:
    """An embedder that records the files each `embed_files` call embeds (all else as `embedder`)."""

    def __init__(self, embedder):
        self._embedder = embedder
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._embedder, name)

    def embed_files(self, paths, **options):
        self.calls.append(list(paths))
        return self._embedder.embed_files(paths, **options)

    def embedded(self, root):
        """The relative paths given to `embed_files` since the last call, sorted."""
        paths = sorted(os.path.relpath(path, root) for call in self.calls for path in call)
        self.calls.clear()
        return paths


# 3. Incremental update


def test_an_update_embeds_only_new_and_changed_files(tiny_model, tmp_path):
    photos = photos_folder(tmp_path / "photos")
    broken = os.path.join(photos, "broken.jpg")
    with open(broken, "wb") as file:
        file.write(b"this is not a JPEG")
    index = str(tmp_path / "photos.index")
    spy = EmbedSpy(tiny_model["embedder"])

    first = update_catalogue(spy, photos, index, dtype="float16", shard_size=4, verbose=0)
    good = readable_images(photos)
    assert len(good) == 12 and spy.embedded(photos) == sorted(good + ["broken.jpg"])
    assert (first.added, first.removed, first.kept, first.rewritten) == (12, 0, 0, 0)
    assert [path for path, _ in first.skipped] == [broken]
    catalogue = first.catalogue
    assert sorted(catalogue.relative_paths()) == good and len(catalogue.shards) == 4  # 3 + 4 + 4 + 1
    manifest = catalogue.manifest
    assert [entry[0] for entry in manifest["skipped"]] == ["broken.jpg"]
    assert (manifest["num_images"], manifest["num_skipped"], manifest["dtype"]) == (12, 1, "float16")
    before = rows_by_path(catalogue)
    shard_of = {path: shard.directory for shard in catalogue.shards for path in shard.relative_paths()}

    # One deleted, one changed (new bytes, a new mtime), one added; the unreadable one unchanged.
    deleted, changed, added = "test/test_class_00/img_1.jpg", "train/train_class_01/img_2.png", "new/img_new.png"
    os.remove(os.path.join(photos, deleted))
    stat = os.stat(os.path.join(photos, changed))
    write_image(os.path.join(photos, changed), np.random.default_rng(7))
    os.utime(os.path.join(photos, changed), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    write_image(os.path.join(photos, added), np.random.default_rng(8))
    second = update_catalogue(spy, photos, index, dtype="float16", shard_size=4, verbose=0)
    assert spy.embedded(photos) == sorted([changed, added])  # not the broken one, still the same
    assert (second.added, second.removed, second.kept) == (2, 2, 10) and second.skipped == []
    assert second.rewritten == len({shard_of[deleted], shard_of[changed]}) == 2
    good = readable_images(photos)
    paths = second.catalogue.relative_paths()
    assert sorted(paths) == good and len(paths) == len(set(paths)) == 12
    after = rows_by_path(second.catalogue)
    assert {path: after[path] for path in before if path not in (deleted, changed)} == \
        {path: row for path, row in before.items() if path not in (deleted, changed)}
    assert after[changed] != before[changed]
    # Rewritten shards replaced the old ones, which are gone; nothing else is in the directory.
    names = sorted(entry["name"] for entry in second.catalogue.manifest["shards"])
    assert sorted(os.listdir(index)) == sorted(names + ["index.lock", "manifest.json"])
    assert [entry[0] for entry in second.catalogue.manifest["skipped"]] == ["broken.jpg"]

    third = update_catalogue(spy, photos, index, dtype="float16", shard_size=4, verbose=0)
    assert spy.calls == [] and (third.added, third.removed, third.kept, third.rewritten) == (0, 0, 12, 0)
    assert rows_by_path(third.catalogue) == after

    # The unreadable file is tried again once it changes, here into a good image.
    write_image(broken, np.random.default_rng(9))
    os.utime(broken, ns=(10**18, 10**18))
    fourth = update_catalogue(spy, photos, index, dtype="float16", shard_size=4, verbose=0)
    assert spy.embedded(photos) == ["broken.jpg"]
    assert (fourth.added, fourth.removed, fourth.kept, fourth.skipped) == (1, 0, 12, [])
    assert fourth.catalogue.manifest["skipped"] == [] and len(fourth.catalogue) == 13
    assert sorted(fourth.catalogue.relative_paths()) == sorted(good + ["broken.jpg"])

    # What an update stores is what the model gives (float16-rounded), and each image finds itself.
    found = tiny_model["embedder"].embed_files([fourth.catalogue.path(i) for i in range(13)])
    np.testing.assert_allclose(fourth.catalogue.unit_rows(), found.embeddings, atol=2e-3)
    distances, items, _ = fourth.catalogue.search(found.embeddings, k=1)
    np.testing.assert_array_equal(items[:, 0], np.arange(13))
    assert distances.max() < 1e-3


def test_files_over_the_pixel_budget_are_tried_again_under_a_larger_one(tiny_model, tmp_path):
    photos = photos_folder(tmp_path / "photos")
    large = os.path.join(photos, "large.png")
    write_image(large, np.random.default_rng(1), size=(64, 64))  # 4096 pixels; the others 1440
    index = str(tmp_path / "photos.index")
    spy = EmbedSpy(tiny_model["embedder"])
    first = update_catalogue(spy, photos, index, max_pixels=2000, verbose=0)
    assert [path for path, _ in first.skipped] == [large] and len(first.catalogue) == 12
    assert [entry[0] for entry in first.catalogue.manifest["skipped"]] == ["large.png"]
    spy.calls.clear()
    again = update_catalogue(spy, photos, index, max_pixels=2000, verbose=0)
    assert spy.calls == [] and again.skipped == []  # unchanged, under the same budget: not tried again
    larger = update_catalogue(spy, photos, index, max_pixels=5000, verbose=0)
    assert spy.embedded(photos) == ["large.png"] and larger.added == 1 and larger.skipped == []
    assert larger.catalogue.manifest["skipped"] == [] and len(larger.catalogue) == 13


def test_a_file_that_decodes_when_checked_again_is_not_recorded_as_unreadable(tiny_model, tmp_path):
    from pnpp_tf.retrieval import embed  # pylint: disable=import-outside-toplevel

    photos = photos_folder(tmp_path / "photos")
    index = str(tmp_path / "photos.index")
    flaky = os.path.join(photos, "test", "test_class_00", "img_0.png")

    class Flaky(EmbedSpy):
        def embed_files(self, paths, **options):
            found = super().embed_files([path for path in paths if path != flaky], **options)
            if flaky in paths:  # as if it failed while embedding and decoded when checked again
                found.skipped.append((flaky, embed.CHANGED_DURING_RUN))
            return found

    first = update_catalogue(Flaky(tiny_model["embedder"]), photos, index, verbose=0)
    assert first.skipped == [(flaky, embed.CHANGED_DURING_RUN)] and len(first.catalogue) == 11
    assert first.catalogue.manifest["skipped"] == []
    spy = EmbedSpy(tiny_model["embedder"])
    second = update_catalogue(spy, photos, index, verbose=0)
    assert spy.embedded(photos) == ["test/test_class_00/img_0.png"] and len(second.catalogue) == 12


# 4. Resumption after a kill


@pytest.mark.parametrize("stop", ["before_publish", "before_commit"])
def test_an_update_killed_mid_build_resumes_where_it_stopped(tiny_model, tmp_path, stop):
    photos = photos_folder(tmp_path / "photos", seed=3)
    index = str(tmp_path / "photos.index")
    env = child_env()
    child = subprocess.run([sys.executable, CHILD, "build", stop, tiny_model["model_dir"], photos, index, "3"],
                           env=env, capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    manifest = json.loads(open(os.path.join(index, "manifest.json"), encoding="utf-8").read())
    assert [entry["name"] for entry in manifest["shards"]] == ["shard-000000", "shard-000001"]
    left = sorted(os.listdir(index))
    if stop == "before_publish":
        assert [name.split(".partial-")[0] for name in left if ".partial-" in name] == ["shard-000002"]
    else:
        assert "shard-000002" in left and not any(".partial-" in name for name in left)
    committed = Catalogue.open(index)
    assert len(committed) == 6
    before = rows_by_path(committed)

    spy = EmbedSpy(tiny_model["embedder"])
    report = update_catalogue(spy, photos, index, shard_size=3, verbose=0)
    good = readable_images(photos)
    assert spy.embedded(photos) == sorted(set(good) - set(before))  # the committed 6 are not embedded again
    assert (report.added, report.removed, report.kept, report.rewritten) == (6, 0, 6, 0)
    paths = report.catalogue.relative_paths()
    assert sorted(paths) == good and len(paths) == len(set(paths)) == 12
    assert {path: row for path, row in rows_by_path(report.catalogue).items() if path in before} == before
    names = [entry["name"] for entry in report.catalogue.manifest["shards"]]
    assert names[:2] == ["shard-000000", "shard-000001"] and len(names) == 4
    assert sorted(os.listdir(index)) == sorted(names + ["index.lock", "manifest.json"])  # no orphan left


def test_an_update_removes_only_what_an_interrupted_update_left(tiny_model, built, tmp_path):
    index = tmp_path / "photos.index"
    index.mkdir()
    (index / "shard-000007.partial-host-12-0123abcd").mkdir()  # a first shard being written when killed
    (index / "manifest.json.partial-host-12-89abcdef").write_text("{")
    update_catalogue(tiny_model["embedder"], built["photos"], str(index), shard_size=5, verbose=0)
    assert sorted(os.listdir(index)) == ["index.lock", "manifest.json", "shard-000000", "shard-000001",
                                         "shard-000002"]
    (index / "shard-000003").mkdir()  # a shard written, never listed
    (index / "shard-000003.partial-host-12-0123abcd").mkdir()
    (index / "shard-notes.txt").write_text("the user's own")  # names no update writes: not removed
    (index / "shard-1").mkdir()
    assert update_catalogue(tiny_model["embedder"], built["photos"], str(index), shard_size=5, verbose=0).kept == 12
    assert sorted(os.listdir(index)) == ["index.lock", "manifest.json", "shard-000000", "shard-000001",
                                         "shard-000002", "shard-1", "shard-notes.txt"]

    # A directory of other files is not made into a catalogue (here, the folder of images itself).
    with pytest.raises(UserError) as raised:
        update_catalogue(tiny_model["embedder"], built["photos"], built["photos"], verbose=0)
    one_line(raised, r"^--index={photos} is not a catalogue index but holds other files \(e.g. test\); give a new "
                     r"or empty directory.$", photos=built["photos"])
    assert sorted(os.listdir(built["photos"])) == ["index.lock", "test", "train"]
    os.remove(os.path.join(built["photos"], "index.lock"))


# 5. One-line errors


def test_an_update_with_another_model_folder_or_dtype_is_refused(tiny_model, built, tmp_path):
    index = copied(built, tmp_path)
    manifest = open(os.path.join(index, "manifest.json"), encoding="utf-8").read()
    for size, dim in ((IMAGE_SIZE, 8), (48, EMBEDDING_DIM)):
        model_dir = tmp_path / f"other_{size}_{dim}"
        model_dir.mkdir()
        build_embedder("small_cnn", size, dim).save(model_dir / "embedder.keras")
        with pytest.raises(UserError) as raised:
            update_catalogue(load_embedder(str(model_dir)), built["photos"], index, verbose=0)
        one_line(raised, r"^--index={index} holds 16-d embeddings of 32 px crops, but --model gives {dim}-d "
                         r"embeddings of {size} px crops: it was built by another model; choose a new --index.$",
                 index=index, dim=dim, size=size)
    with pytest.raises(UserError) as raised:
        update_catalogue(tiny_model["embedder"], built["photos"], index, dtype="int8", verbose=0)
    one_line(raised, r"^--index_dtype=int8 but --index=.* stores float32; pass --index_dtype=float32")
    other = photos_folder(tmp_path / "other photos")
    with pytest.raises(UserError) as raised:
        update_catalogue(tiny_model["embedder"], other, index, verbose=0)
    one_line(raised, r"^--index={index} indexes {photos}, not --images={other}; choose a new --index.$",
             index=index, photos=built["photos"], other=other)
    assert open(os.path.join(index, "manifest.json"), encoding="utf-8").read() == manifest  # untouched


def test_an_update_with_a_changed_model_file_is_refused(tiny_model, tmp_path):
    model_dir = tmp_path / "run"
    shutil.copytree(tiny_model["model_dir"], model_dir)
    embedder = load_embedder(str(model_dir))
    photos = str(tmp_path / "photos")
    write_image(os.path.join(photos, "a.png"), np.random.default_rng(0))
    index = str(tmp_path / "photos.index")
    update_catalogue(embedder, photos, index, verbose=0)
    model_file = str(model_dir / "embedder.keras")
    stat = os.stat(model_file)
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(UserError) as raised:
        update_catalogue(embedder, photos, index, verbose=0)
    one_line(raised, r"^--index={index} was built with the model {model} as it was on .*; {model} is another "
                     r"model or has changed since.*choose a new --index.$", index=index, model=model_file)
    with pytest.raises(UserError) as raised:
        update_catalogue(tiny_model["embedder"], photos, index, verbose=0)
    one_line(raised, r"was built with the model {model} .*; {other} is another model", model=model_file,
             other=os.path.join(tiny_model["model_dir"], "embedder.keras"))


def test_a_damaged_shard_is_left_out_of_searches_and_embedded_again(tiny_model, built, tmp_path, caplog):
    index = copied(built, tmp_path)
    whole = Catalogue.open(index)
    assert len(whole.shards) == 3 and len(whole) == 12
    middle = whole.shards[1]
    lost = middle.relative_paths()
    os.remove(os.path.join(middle.directory, "sizes.npy"))
    with caplog.at_level("WARNING"):
        catalogue = Catalogue.open(index)
    assert [name for name, _ in catalogue.damaged] == ["shard-000001"]
    assert "shard-000001 is damaged (FileNotFoundError" in catalogue.damaged[0][1]
    assert "searching the other shards" in caplog.text
    assert len(catalogue) == 12 - len(lost) and len(catalogue.shards) == 2
    rows = catalogue.unit_rows()
    _, items, _ = catalogue.search(rows, k=1)
    np.testing.assert_array_equal(items[:, 0], np.arange(len(rows)))
    assert not set(catalogue.relative_paths()) & set(lost)

    spy = EmbedSpy(tiny_model["embedder"])
    report = update_catalogue(spy, built["photos"], index, shard_size=5, verbose=0)
    assert spy.embedded(built["photos"]) == sorted(lost)
    assert (report.added, report.removed, report.kept) == (len(lost), len(lost), 12 - len(lost))
    assert report.catalogue.damaged == [] and sorted(report.catalogue.relative_paths()) == \
        readable_images(built["photos"])
    assert not os.path.exists(middle.directory)

    for name in ("shard-000000", "shard-000002", "shard-000003"):  # every shard damaged
        shutil.rmtree(os.path.join(index, name))
    with pytest.raises(UserError) as raised:
        Catalogue.open(index)
    one_line(raised, r"^--index={index}: every shard is damaged, e.g. shard .* is damaged", index=index)


def test_a_manifest_of_a_newer_format_or_no_catalogue_is_refused(tiny_model, built, tmp_path):
    index = copied(built, tmp_path)
    manifest_path = os.path.join(index, "manifest.json")
    manifest = json.loads(open(manifest_path, encoding="utf-8").read())
    write_json(manifest_path, {**manifest, "format_version": catalogue_lib.FORMAT_VERSION + 1})
    newer = rf"^--index={re.escape(index)} was written by a newer pnpp_tf \(format {catalogue_lib.FORMAT_VERSION + 1}, "
    with pytest.raises(UserError) as raised:
        Catalogue.open(index)
    one_line(raised, newer)
    with pytest.raises(UserError) as raised:
        update_catalogue(tiny_model["embedder"], built["photos"], index, verbose=0)
    one_line(raised, newer)
    write_json(manifest_path, {**manifest, "format": "something else"})
    with pytest.raises(UserError) as raised:
        Catalogue.open(index)
    one_line(raised, r"manifest.json is not a pnpp_tf catalogue manifest")
    with open(manifest_path, "w", encoding="utf-8") as file:
        file.write('{"format": "pnpp_tf catal')
    with pytest.raises(UserError) as raised:
        Catalogue.open(index)
    one_line(raised, r"manifest.json: this catalogue manifest is not valid JSON")

    with pytest.raises(UserError) as raised:
        Catalogue.open(built["photos"])
    one_line(raised, r"^--index={photos} holds no manifest.json: it is not a catalogue index", photos=built["photos"])
    with pytest.raises(UserError) as raised:
        Catalogue.open(str(tmp_path / "missing"))
    one_line(raised, r"^--index=.*missing is not a catalogue index directory")
    assert not catalogue_lib.is_catalogue(built["photos"]) and catalogue_lib.is_catalogue(built["index"])


def test_a_catalogue_in_use_is_refused(tiny_model, built, tmp_path):
    index = copied(built, tmp_path)
    with RunLock(index, flag="--index", file_name=cataloguing.LOCK_FILE, holder="pnpp_tf.index"):
        with pytest.raises(UserError) as raised:
            update_catalogue(tiny_model["embedder"], built["photos"], index, verbose=0)
    one_line(raised, r"^--index={index} is in use by another pnpp_tf.index \(pid {pid} ", index=index, pid=os.getpid())
    assert update_catalogue(tiny_model["embedder"], built["photos"], index, verbose=0).kept == 12  # free again


def test_bad_update_options_are_refused(tiny_model, built, tmp_path):
    index = str(tmp_path / "new.index")
    with pytest.raises(UserError, match="^--shard_size must be at least 1, got 0"):
        update_catalogue(tiny_model["embedder"], built["photos"], index, shard_size=0, verbose=0)
    with pytest.raises(UserError, match="^--index_dtype='float64' is not one of float32, float16, int8"):
        update_catalogue(tiny_model["embedder"], built["photos"], index, dtype="float64", verbose=0)
    with pytest.raises(UserError, match="is not a directory"):
        update_catalogue(tiny_model["embedder"], str(tmp_path / "missing"), index, verbose=0)
    assert not catalogue_lib.is_catalogue(index)


def test_a_folder_of_unreadable_files_is_refused_in_one_line(tiny_model, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not a JPEG")
    (photos / "b.png").write_bytes(b"not a PNG")
    index = str(tmp_path / "photos.index")
    for _ in range(2):  # the second time, nothing is read again: they are listed unreadable
        with pytest.raises(UserError) as raised:
            update_catalogue(tiny_model["embedder"], str(photos), index, verbose=0)
        one_line(raised, r"^None of the 2 images under --images={photos} could be read, e.g. a.jpg \(.+\).$",
                 photos=photos)


def test_an_update_builds_structures_and_rebuilds_them_when_asked_for_another(tiny_model, built, tmp_path):
    ann = import_ann("hnsw")
    index = copied(built, tmp_path)
    exact = Catalogue.open(index)
    queries = exact.unit_rows()
    exact_distances, _, _ = exact.search(queries, k=5)
    spy = EmbedSpy(tiny_model["embedder"])
    report = update_catalogue(spy, built["photos"], index, backend="hnsw", shard_size=5, verbose=0)
    assert spy.calls == [] and (report.added, report.removed, report.kept, report.rewritten) == (0, 0, 12, 3)
    catalogue = report.catalogue
    assert catalogue.manifest["approximate"] == {"backend": "hnsw", "params": ann.AnnParams().to_json()}
    assert all(os.path.isfile(shard.structure_path("hnsw")) for shard in catalogue.shards)
    assert rows_by_path(catalogue) == rows_by_path(exact)  # rebuilt from the stored rows, not embedded
    distances, items, used = catalogue.search(queries, k=5)
    assert used == "hnsw"
    np.testing.assert_array_equal(items[:, 0], np.arange(12))
    # Whole shortlists: the exact lists' distances, up to float32 rounding of 16-d dot products.
    np.testing.assert_allclose(distances, exact_distances, atol=1e-6)

    again = update_catalogue(spy, built["photos"], index, backend="hnsw", shard_size=5, verbose=0)
    assert again.rewritten == 0 and spy.calls == []  # the same structure: nothing to do
    params = ann.AnnParams(connectivity=8)
    changed = update_catalogue(spy, built["photos"], index, backend="hnsw", params=params, shard_size=5,
                               verbose=0)
    assert changed.rewritten == 3 and spy.calls == []
    kept = update_catalogue(spy, built["photos"], index, shard_size=5, verbose=0)  # backend="auto": as built
    assert kept.rewritten == 0 and kept.catalogue.manifest["approximate"]["params"] == params.to_json()
    dropped = update_catalogue(spy, built["photos"], index, backend="exact", shard_size=5, verbose=0)
    assert dropped.rewritten == 3 and dropped.catalogue.manifest["approximate"] is None
    assert not any(os.path.exists(shard.structure_path("hnsw")) for shard in dropped.catalogue.shards)
    assert dropped.catalogue.search(queries, k=1)[2] == "exact"


def test_an_update_stopped_while_rebuilding_structures_rebuilds_the_rest(tiny_model, built, tmp_path, monkeypatch):
    ann = import_ann("hnsw")
    index = copied(built, tmp_path)
    build = ann.build
    calls = []

    def build_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first shard is rebuilt and committed; the run stops at the second
            raise KeyboardInterrupt
        return build(*args, **kwargs)

    monkeypatch.setattr(ann, "build", build_then_stop)
    with pytest.raises(KeyboardInterrupt):
        update_catalogue(tiny_model["embedder"], built["photos"], index, backend="hnsw", shard_size=5, verbose=0)
    monkeypatch.setattr(ann, "build", build)
    report = update_catalogue(tiny_model["embedder"], built["photos"], index, backend="hnsw", shard_size=5, verbose=0)
    assert report.rewritten == 2 and report.added == 0
    assert all(os.path.isfile(shard.structure_path("hnsw")) for shard in report.catalogue.shards)
    _, items, used = report.catalogue.search(report.catalogue.unit_rows(), k=1)
    assert used == "hnsw"
    np.testing.assert_array_equal(items[:, 0], np.arange(12))

