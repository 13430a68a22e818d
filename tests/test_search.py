"""pnpp_tf.retrieval (embed, search_index), pnpp_tf.artifacts.load_embedder, pnpp_tf.index and
pnpp_tf.search: index a generated folder, query it."""

import io
import json
import os
import re

import keras
import numpy as np
import pytest
from PIL import Image

from cli_helpers import run_module
from conftest import make_folder_dataset
from pnpp_tf import plots
from pnpp_tf.catalogue_config import IndexConfig, SearchConfig
from pnpp_tf.serving import signatures
from pnpp_tf.retrieval import neighbours, search_index
from pnpp_tf.retrieval.embed import find_images
from pnpp_tf.artifacts import load_embedder
from pnpp_tf.modeling.model import build_embedder

IMAGE_SIZE = 32
EMBEDDING_DIM = 16
BAD_FILES = ("broken.jpg", "nested/truncated.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model_dir and an image folder with two unreadable files and one non-image."""
    root = tmp_path_factory.mktemp("search")
    keras.utils.set_random_seed(0)
    embedder = build_embedder("small_cnn", IMAGE_SIZE, EMBEDDING_DIM)
    model_dir = root / "run"
    model_dir.mkdir()
    embedder.save(model_dir / "embedder.keras")
    photos = make_folder_dataset(root / "photos", train_classes=2, test_classes=2,
                                 images_per_class=3)
    (root / "photos" / "broken.jpg").write_bytes(b"this is not a JPEG")
    good_png = next((root / "photos").rglob("*.png")).read_bytes()
    (root / "photos" / "nested").mkdir()
    (root / "photos" / "nested" / "truncated.png").write_bytes(good_png[:len(good_png) // 2])
    (root / "photos" / "notes.txt").write_text("not an image")
    good = sorted(str(p) for p in (root / "photos").rglob("img_*"))
    return {"root": root, "model_dir": str(model_dir), "photos": photos, "good": good,
            "embedder": embedder}


def test_find_images_is_recursive_sorted_and_skips_other_files(setup):
    paths = find_images(setup["photos"])
    assert len(paths) == len(setup["good"]) + len(BAD_FILES) == 14
    assert paths == find_images(setup["photos"])  # a deterministic order
    assert set(paths) == set(setup["good"]) | {os.path.join(setup["photos"], f) for f in BAD_FILES}
    assert not any(p.endswith(".txt") for p in paths)
    assert all(os.path.isabs(p) for p in paths)
    with pytest.raises(ValueError, match="holds no image files"):
        find_images(str(setup["root"] / "run"))
    with pytest.raises(ValueError, match="is not a directory"):
        find_images(str(setup["root"] / "missing"))


def test_find_images_follows_folder_links_once_and_keeps_file_links_to_report(tmp_path, caplog):
    rng = np.random.default_rng(0)
    root, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    for path in (root / "real" / "a.png", elsewhere / "b.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    os.symlink(elsewhere, root / "outside")  # a link out of the root: followed
    os.symlink(root / "real", root / "alias")  # a second way into real/: searched once, as real/
    os.symlink("..", root / "real" / "up")  # back to the root: a loop
    os.symlink("loop.jpg", root / "loop.jpg")  # a file link that cannot be followed: kept, to report
    os.mkfifo(root / "pipe.png")  # reading it would never end
    paths = find_images(str(root))
    assert paths == [str(root / "loop.jpg"), str(root / "outside" / "b.png"), str(root / "real" / "a.png")]
    warned = caplog.text
    assert f"Not following {root / 'alias'}" in warned and f"Not following {root / 'real' / 'up'}" in warned


def test_index_counts_unreadable_files_and_finds_each_image_first(setup, tmp_path):
    embedder = load_embedder(setup["model_dir"])
    assert (embedder.kind, embedder.image_size, embedder.embedding_dim) == ("keras", 32, 16)
    paths = find_images(setup["photos"])
    index = search_index.build_index(embedder, paths, setup["photos"], batch_size=5, verbose=0)
    assert len(index) == 12 and index.embeddings.shape == (12, EMBEDDING_DIM)
    assert index.metadata["num_skipped"] == 2
    assert index.metadata["images_per_second"] == pytest.approx(12 / index.metadata["embed_seconds"])
    skipped = {os.path.relpath(path, setup["photos"]): reason
               for path, reason in index.metadata["skipped"]}
    assert set(skipped) == set(BAD_FILES)
    assert all(reason for reason in skipped.values())  # each says why
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)

    path = tmp_path / "sub" / "photos.npz"
    index.save(str(path))
    assert os.listdir(path.parent) == ["photos.npz"]  # no .partial left, no extra suffix
    loaded = search_index.SearchIndex.load(str(path))
    assert loaded.paths == index.paths and loaded.metadata == index.metadata
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)

    # Each image, embedded again on its own, finds itself first at distance ~0.
    found = embedder.embed_files(index.paths, batch_size=1)
    queries = found.embeddings
    assert found.paths == index.paths
    distances, found, backend = loaded.search(queries, k=3)
    assert backend == "exact"
    np.testing.assert_array_equal(found[:, 0], np.arange(12))
    assert distances[:, 0].max() < 1e-5
    assert np.all(np.diff(distances, axis=1) >= 0)


@pytest.mark.slow
def test_index_and_search_command_lines(setup, tmp_path):
    index_path = tmp_path / "photos.index"
    result = run_module("pnpp_tf.index", f"--model={setup['model_dir']}",
                        f"--images={setup['photos']}", f"--index={index_path}", "--noprogress")
    assert result.returncode == 0, result.stderr
    assert f"Indexed 12 images under {setup['photos']}" in result.stdout
    assert "12 added" in result.stdout and "stored as float32" in result.stdout
    assert "Skipped 2 unreadable file(s):" in result.stdout
    assert "broken.jpg" in result.stdout and "truncated.png" in result.stdout

    query = setup["good"][4]
    grid = tmp_path / "grid.png"
    result = run_module("pnpp_tf.search", f"--index={index_path}", f"--query={query}", "--k=3",
                        f"--grid={grid}")
    assert result.returncode == 0, result.stderr
    assert "cosine distance (1 - cosine similarity" in result.stdout
    rows = re.findall(r"^\s+(\d+)\s+([0-9.]+)\s+(\S.*)$", result.stdout, re.MULTILINE)
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert rows[0][2] == query and float(rows[0][1]) < 1e-3
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.size == plots.grid_size(1, 4, title=False)

    # Many queries: a list file (with an unreadable one) answered as JSON lines, in order.
    listing = tmp_path / "queries.txt"
    bad = os.path.join(setup["photos"], BAD_FILES[0])
    listing.write_text("\n".join([setup["good"][0], bad, setup["good"][7]]) + "\n")
    answers = tmp_path / "answers.jsonl"
    result = run_module("pnpp_tf.search", f"--index={index_path}", f"--query={listing}", "--k=2",
                        f"--output={answers}")
    assert result.returncode == 0, result.stderr
    assert "Answered 2 queries (1 could not be read)" in result.stderr
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [line["query"] for line in lines] == [setup["good"][0], bad, setup["good"][7]]
    assert lines[0]["neighbours"][0] == setup["good"][0] and "error" in lines[1]
    assert lines[2]["neighbours"][0] == setup["good"][7] and len(lines[2]["distances"]) == 2


def test_many_queries_answer_as_one_query_each(setup, tmp_path):
    """A folder of queries, embedded in batches, gets the lists each query gets alone."""
    from pnpp_tf import index, search  # pylint: disable=import-outside-toplevel

    index_path = str(tmp_path / "photos.index")
    index.run(IndexConfig(model=setup["model_dir"], images=setup["photos"], index=index_path, shard_size=5,
                          progress=False))
    out = io.StringIO()
    answered, unreadable, backend = search.run(
        SearchConfig(index=index_path, query=setup["photos"], k=4, batch_size=3), out=out)
    assert (answered, unreadable, backend) == (12, 2, "exact")
    lines = {json.loads(line)["query"]: json.loads(line) for line in out.getvalue().splitlines()}
    for query in setup["good"][::3]:
        searcher, distances, items, _ = search.run(SearchConfig(index=index_path, query=query, k=4))
        assert lines[query]["items"] == items.tolist()
        assert lines[query]["neighbours"] == [searcher.index.path(i) for i in items]
        np.testing.assert_allclose(lines[query]["distances"], distances, atol=1e-5)
        assert "matches" not in lines[query]


def test_threshold_decides_which_neighbours_match(setup, tmp_path, capsys):
    from pnpp_tf import index, search  # pylint: disable=import-outside-toplevel

    index_path = str(tmp_path / "photos.index")
    index.run(IndexConfig(model=setup["model_dir"], images=setup["photos"], index=index_path, progress=False))
    query = setup["good"][2]
    _, distances, _, _ = search.run(SearchConfig(index=index_path, query=query, k=6))
    # Midway across the widest gap after the query itself: a query embedded in another batch
    # moves its distances by rounding only, far less than the gap.
    cut = 1 + int(np.argmax(np.diff(distances[1:])))
    assert distances[cut + 1] - distances[cut] > 1e-4, distances
    threshold = 1.0 - float(distances[cut] + distances[cut + 1]) / 2
    out = io.StringIO()
    search.run(SearchConfig(index=index_path, query=setup["photos"], k=6, threshold=threshold), out=out)
    line = next(json.loads(text) for text in out.getvalue().splitlines() if json.loads(text)["query"] == query)
    assert line["matches"] == [bool(1.0 - d >= threshold) for d in distances]
    assert line["matches"] == [True] * (cut + 1) + [False] * (5 - cut)

    search.main(SearchConfig(index=index_path, query=query, k=6, threshold=threshold))
    table = capsys.readouterr().out
    assert f"A match: cosine similarity at least {threshold:g}" in table
    rows = re.findall(r"^\s+(\d+)\s+([0-9.]+)\s+(yes|no)\s+(\S.*)$", table, re.MULTILINE)
    assert [row[2] == "yes" for row in rows] == line["matches"]
    assert search.is_match([0.25, 0.2500001], 0.75).tolist() == [True, False]  # on the threshold: a match
    with pytest.raises(ValueError, match="--threshold=1.5: must be at most 1.0"):
        SearchConfig(index=index_path, query=query, threshold=1.5)


def test_command_line_errors_raise_value_errors(setup, tmp_path):
    """What the entry points print as one `pnpp_tf.<tool>: error: ...` line, exit status 2."""
    from pnpp_tf import index, search  # pylint: disable=import-outside-toplevel

    def index_run(model, images, index_path):
        return index.run(IndexConfig(model=model, images=images, index=index_path, progress=False))

    with pytest.raises(ValueError, match="--model="):
        index_run(str(tmp_path), setup["photos"], str(tmp_path / "x.index"))
    with pytest.raises(ValueError, match="are all required"):
        index_run(setup["model_dir"], None, str(tmp_path / "x.index"))
    (tmp_path / "old.npz").write_text("an index of an earlier pnpp_tf")
    with pytest.raises(ValueError, match="is a file"):
        index_run(setup["model_dir"], setup["photos"], str(tmp_path / "old.npz"))
    assert not (tmp_path / "x.index").exists()
    with pytest.raises(ValueError, match="--index=.*does not exist"):
        search.run(SearchConfig(index=str(tmp_path / "missing.npz"), query=setup["good"][0]))
    with pytest.raises(ValueError, match="--query=.*is not a file or a folder"):
        search.run(SearchConfig(index=str(tmp_path / "missing.npz"), query=str(tmp_path / "missing.png")))
    index_path = str(tmp_path / "photos.index")
    index.run(IndexConfig(model=setup["model_dir"], images=setup["photos"], index=index_path, progress=False))
    with pytest.raises(ValueError, match="--k=13 must be between 1 and the 12 images"):
        search.run(SearchConfig(index=index_path, query=setup["good"][0], k=13))
    with pytest.raises(ValueError, match="cannot read --query=.*broken.jpg"):
        search.run(SearchConfig(index=index_path, query=os.path.join(setup["photos"], BAD_FILES[0])))
    with pytest.raises(ValueError, match="--backend=hnsw: the catalogue .* was built without"):
        search.run(SearchConfig(index=index_path, query=setup["good"][0], backend="hnsw"))
    with pytest.raises(ValueError, match="--grid draws one query"):
        search.run(SearchConfig(index=index_path, query=setup["photos"], grid=str(tmp_path / "g.png")))


def test_exported_saved_model_base_dir_uses_highest_version(setup, tmp_path):
    base = tmp_path / "export"
    signatures.EmbedderServingModule(setup["embedder"]).save(str(base / "2"))
    (base / "parity").mkdir()
    (base / "parity" / "2.json").write_text("{}")  # published: its parity report is there
    (base / "1").mkdir()  # not a SavedModel: ignored
    (base / "7").mkdir()  # an unfinished version: ignored too
    embedder = load_embedder(str(base))
    assert embedder.kind == "saved_model" and embedder.source == str(base / "2")
    assert (embedder.image_size, embedder.embedding_dim) == (IMAGE_SIZE, EMBEDDING_DIM)
    keras_embedder = load_embedder(setup["model_dir"])
    paths = setup["good"][:3]
    exported = embedder.embed_files(paths).embeddings
    reference = keras_embedder.embed_files(paths).embeddings
    np.testing.assert_allclose(exported, reference, atol=1e-5)
    assert load_embedder(str(base / "2")).source == str(base / "2")


def test_load_errors(setup, tmp_path):
    with pytest.raises(ValueError, match="no embedder.keras"):
        load_embedder(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_embedder(str(tmp_path / "nothing"))
    not_an_index = tmp_path / "x.npz"
    not_an_index.write_text("hello")
    with pytest.raises(ValueError, match="not an index"):
        search_index.SearchIndex.load(str(not_an_index))
    with pytest.raises(ValueError, match="None of the 2 images"):
        embedder = load_embedder(setup["model_dir"])
        search_index.build_index(embedder, [os.path.join(setup["photos"], f) for f in BAD_FILES],
                                 verbose=0)


def test_nearest_orders_ties_by_index_and_excludes():
    gallery = np.array([[1, 0], [0, 1], [1, 0], [1, 1], [2, 0]], np.float32)
    similarities, indices, backend = search_index.cosine_neighbours([[1, 0]], gallery, k=4, backend="exact")
    assert backend == "exact"
    np.testing.assert_array_equal(indices, [[0, 2, 4, 3]])
    np.testing.assert_allclose(similarities, [[1, 1, 1, np.sqrt(0.5)]], atol=1e-6)
    # Queries that are gallery items, each excluded from its own list.
    _, indices, _ = search_index.cosine_neighbours(gallery[:3], gallery, k=2, exclude=[0, 1, 2])
    np.testing.assert_array_equal(indices, [[2, 4], [3, 0], [0, 4]])
    with pytest.raises(ValueError, match="k=5"):
        search_index.cosine_neighbours(gallery[:1], gallery, k=5, exclude=[0])
    with pytest.raises(ValueError, match="3-d"):
        search_index.cosine_neighbours(np.ones((1, 3)), gallery, k=1)


def test_faiss_is_chosen_above_the_threshold(monkeypatch):
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(200, 8)).astype(np.float32)
    queries = gallery[:5] + 0.01 * rng.normal(size=(5, 8)).astype(np.float32)
    exact = search_index.cosine_neighbours(queries, gallery, k=7, exclude=[0, -1, 2, -1, 4], backend="exact")
    monkeypatch.setattr(search_index, "FAISS_MIN_IMAGES", 100)
    has_faiss = neighbours.import_faiss() is not None
    auto = search_index.cosine_neighbours(queries, gallery, k=7, exclude=[0, -1, 2, -1, 4])
    assert auto[2] == ("faiss" if has_faiss else "exact")
    np.testing.assert_array_equal(auto[1], exact[1])
    np.testing.assert_allclose(auto[0], exact[0], atol=1e-5)
    monkeypatch.setattr(search_index, "FAISS_MIN_IMAGES", 1000)
    assert search_index.cosine_neighbours(queries, gallery, k=1)[2] == "exact"
