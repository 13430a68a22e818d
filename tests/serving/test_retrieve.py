"""pnpp_tf.serving.retrieve: the in-graph catalogue search, against the exact k-NN engine.

Galleries and queries whose rows hold one ±1 or four ±0.5 entries: unit rows whose dot products
are sums of multiples of 1/4, exact in float32 in any order of summation, so the signatures must
agree with `neighbours.nearest` bit for bit, ties (many, and duplicate rows) included. A tiny
random-weight small_cnn embeds the images; one SavedModel (module fixture) serves every test of
the saved signatures.
"""

import io
import os
import re
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import write_image
from pnpp_tf.errors import UserError
from pnpp_tf.modeling.model import build_embedder
from pnpp_tf.retrieval import neighbours
from pnpp_tf.retrieval.search_index import SearchIndex, cosine_distance
from pnpp_tf.serving import retrieve, signatures
from tf_serving_stand_in import predict_request, prediction_service, saved_model_cli

IMAGE_SIZE = 32
DIM = 16
NUM_ITEMS = 37  # not a multiple of BLOCK: the last block is partial
BLOCK = 8
MAX_K = 20
MAX_PIXELS = 64 * 64


def exact_rows(rng, count):
    """Unit rows of one ±1 or four ±0.5 entries (float32, exact in float16 too)."""
    rows = np.zeros((count, DIM), np.float32)
    for row in rows:
        if rng.random() < 0.3:
            row[rng.integers(DIM)] = rng.choice([-1.0, 1.0])
        else:
            row[rng.choice(DIM, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return rows


def exact_gallery():
    gallery = exact_rows(np.random.default_rng(0), NUM_ITEMS)
    gallery[[12, 30, 36]] = gallery[3]  # duplicates in other blocks, one in the partial block
    gallery[20] = gallery[21]           # and side by side
    return gallery


def encoded(rng, fmt, size=(40, 36)):
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def embedder():
    return build_embedder("small_cnn", IMAGE_SIZE, DIM, weights=None)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(2)
    return [encoded(rng, fmt) for fmt in ("PNG", "JPEG", "PNG", "JPEG", "PNG")]


@pytest.fixture(scope="module")
def saved(embedder, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("retrieve") / "1")
    ids = [f"class_{i % 5}/item_{i}.jpg" for i in range(NUM_ITEMS)]
    module = retrieve.RetrievalServingModule(embedder, exact_gallery(), ids, max_pixels=MAX_PIXELS,
                                             max_k=MAX_K, block_size=BLOCK)
    module.save(path)
    return {"path": path, "ids": ids, "loaded": tf.saved_model.load(path)}


def check_against_engine(found, queries, gallery, k, ids=None):
    scores, indices = neighbours.nearest(queries, gallery, k, backend="exact")
    np.testing.assert_array_equal(found["indices"].numpy(), indices)
    np.testing.assert_array_equal(found["scores"].numpy(), scores)
    np.testing.assert_array_equal(found["distances"].numpy(), cosine_distance(scores))
    if ids is not None:
        np.testing.assert_array_equal(found["ids"].numpy().astype(str), np.asarray(ids)[indices])


@pytest.mark.parametrize("block_size", [1, 5, BLOCK, NUM_ITEMS - 1, NUM_ITEMS, 64])
@pytest.mark.parametrize("k", [1, 6, NUM_ITEMS])
def test_blockwise_top_k_is_the_exact_engine_ties_included(block_size, k):
    gallery = exact_gallery()
    queries = np.concatenate([exact_rows(np.random.default_rng(1), 9), gallery[[3, 21]]])
    scores, indices = retrieve.blockwise_top_k(tf.constant(queries), tf.constant(gallery), k, block_size)
    reference_scores, reference = neighbours.nearest(queries, gallery, k, backend="exact")
    np.testing.assert_array_equal(indices.numpy(), reference)
    np.testing.assert_array_equal(scores.numpy(), reference_scores)
    if k > 1:  # the data has ties to break: equal neighbouring scores in most lists
        assert np.mean(np.any(reference_scores[:, 1:] == reference_scores[:, :-1], axis=1)) > 0.5


def test_saved_signature_is_the_exact_engine(saved):
    loaded, gallery = saved["loaded"], exact_gallery()
    assert int(loaded.max_k.numpy()) == MAX_K and loaded.gallery.dtype == tf.float32
    queries = np.concatenate([exact_rows(np.random.default_rng(3), 12), gallery[[3, 20, 0]]])
    search = loaded.signatures[retrieve.EMBEDDINGS_SIGNATURE]
    for k in (1, 7, MAX_K):
        found = search(embedding=tf.constant(queries), k=tf.constant(k, tf.int32))
        assert sorted(found) == sorted(retrieve.OUTPUTS) and found["indices"].dtype == tf.int64
        check_against_engine(found, queries, gallery, k, saved["ids"])
    # Row 3 finds its copies first (12, 30, 36 and any the draw made), in index order.
    copies = np.flatnonzero((gallery == gallery[3]).all(axis=1))
    assert {3, 12, 30, 36} <= set(copies) and list(found["indices"].numpy()[-3][:len(copies)]) == list(copies)


def test_float16_gallery_is_the_engine_on_the_rounded_gallery(embedder):
    gallery = exact_gallery()
    # Off the float16 grid by far less than its spacing (2**-11 near 0.5): stored, it rounds
    # back to `gallery`, whose dot products are exact.
    nudged = np.where(gallery != 0, gallery * np.float32(1 + 1e-5), 0).astype(np.float32)
    module = retrieve.RetrievalServingModule(embedder, nudged, [str(i) for i in range(NUM_ITEMS)],
                                             max_k=MAX_K, dtype="float16", block_size=BLOCK)
    assert module.gallery.dtype == tf.float16
    np.testing.assert_array_equal(module.gallery.numpy().astype(np.float32), gallery)
    queries = exact_rows(np.random.default_rng(4), 10)
    for k in (1, 5, MAX_K):
        check_against_engine(module.retrieve_embeddings(tf.constant(queries), k), queries, gallery, k)
    # Random rows: scored as they are stored, rounded (their norms 1 +- 1e-4, not renormalised).
    rows = np.random.default_rng(5).normal(size=(300, DIM)).astype(np.float32)
    module = retrieve.RetrievalServingModule(embedder, rows, [str(i) for i in range(300)],
                                             dtype="float16", block_size=64)
    rounded = neighbours.unit_rows(rows).astype(np.float16).astype(np.float64)
    queries = neighbours.unit_rows(np.random.default_rng(6).normal(size=(8, DIM)))
    found = module.retrieve_embeddings(tf.constant(queries), 10)
    scores = queries @ rounded.T
    indices = np.lexsort((np.broadcast_to(np.arange(300), scores.shape), -scores), axis=1)[:, :10]
    np.testing.assert_array_equal(found["indices"].numpy(), indices)
    np.testing.assert_allclose(found["scores"].numpy(), np.take_along_axis(scores, indices, 1), atol=1e-6)


def test_image_bytes_are_decoded_and_embedded_as_serve_image_bytes_does(embedder, images):
    rng = np.random.default_rng(7)
    module = signatures.EmbedderServingModule(embedder, max_pixels=MAX_PIXELS)
    own = module.serve_image_bytes(tf.constant(images))["embedding"].numpy()
    # The images themselves among random rows: each finds itself first.
    gallery = np.concatenate([rng.normal(size=(20, DIM)), own, rng.normal(size=(20, DIM))]).astype(np.float32)
    module = retrieve.RetrievalServingModule(embedder, gallery, [str(i) for i in range(len(gallery))],
                                             max_pixels=MAX_PIXELS, block_size=BLOCK)
    found = module.retrieve(tf.constant(images), tf.constant(5))
    scores, indices = neighbours.nearest(own, gallery, 5, backend="exact")
    np.testing.assert_array_equal(found["indices"].numpy(), indices)
    np.testing.assert_allclose(found["scores"].numpy(), scores, atol=1e-6)
    assert list(indices[:, 0]) == list(range(20, 20 + len(images)))
    same = module.retrieve_embeddings(module.serve_image_bytes(tf.constant(images))["embedding"], 5)
    for name in retrieve.OUTPUTS:
        np.testing.assert_array_equal(found[name].numpy(), same[name].numpy())


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1])
def test_k_out_of_range_is_refused_naming_k_and_the_bound(saved, images, k):
    message = rf"k={k} is out of range: it must be between 1 and max_k={MAX_K} .*holds {NUM_ITEMS} items"
    signatures_ = saved["loaded"].signatures
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        signatures_["retrieve_embeddings"](embedding=tf.constant(exact_gallery()[:2]), k=tf.constant(k))
    # Checked before any image is decoded: the bad file below is never looked at.
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        signatures_["retrieve"](image_bytes=tf.constant([images[0], b"not an image"]), k=tf.constant(k))


def test_bad_images_and_embeddings_fail_as_serve_image_bytes_does(saved, images):
    retrieve_fn = saved["loaded"].signatures["retrieve"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes\[1\] \(12 bytes\) is not a JPEG or PNG"):
        retrieve_fn(image_bytes=tf.constant([images[0], b"not an image"]), k=tf.constant(3))
    large = encoded(np.random.default_rng(8), "PNG", size=(100, 100))
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"image_bytes\[0\] is 100x100 = 10000 pixels, "
                                                             rf"more than max_pixels={MAX_PIXELS}"):
        retrieve_fn(image_bytes=tf.constant([large]), k=tf.constant(3))
    with pytest.raises(tf.errors.InvalidArgumentError, match="embedding has NaN or infinite values"):
        saved["loaded"].signatures["retrieve_embeddings"](
            embedding=tf.constant([[np.nan] * DIM], tf.float32), k=tf.constant(3))
    assert retrieve_fn(image_bytes=tf.constant(images[:1]), k=tf.constant(3))["ids"].shape == (1, 3)


def test_empty_batches_get_empty_answers(saved):
    signatures_ = saved["loaded"].signatures
    for found in (signatures_["retrieve"](image_bytes=tf.constant([], tf.string), k=tf.constant(4)),
                  signatures_["retrieve_embeddings"](embedding=tf.zeros([0, DIM]), k=tf.constant(4))):
        assert {name: tuple(value.shape) for name, value in found.items()} == {
            name: (0, 4) for name in retrieve.OUTPUTS}


def test_max_k_is_at_most_the_gallery(embedder):
    module = retrieve.RetrievalServingModule(embedder, exact_gallery()[:6], list("abcdef"))
    assert int(module.max_k.numpy()) == 6
    check_against_engine(module.retrieve_embeddings(tf.constant(exact_gallery()[:3]), 6),
                         exact_gallery()[:3], exact_gallery()[:6], 6, list("abcdef"))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"k=7 is out of range.*max_k=6"):
        module.retrieve_embeddings(tf.constant(exact_gallery()[:3]), 7)


@pytest.mark.parametrize("change, message", [
    (dict(dtype="int8"), r"dtype='int8' is not one of float32, float16"),
    (dict(max_k=0), r"max_k must be at least 1, got 0"),
    (dict(block_size=0), r"block_size must be at least 1, got 0"),
    (dict(ids=["a"]), r"1 ids for a gallery of 37 rows"),
    (dict(gallery=np.ones((4, DIM + 1))), r"gallery's rows are 17-d but the embedder's embeddings are 16-d"),
    (dict(gallery=np.zeros((0, DIM))), r"gallery is empty"),
    (dict(gallery=np.full((2, DIM), np.inf)), r"gallery has 2 row\(s\) with NaN or infinite values"),
])
def test_bad_arguments_are_named(embedder, change, message):
    arguments = dict(gallery=exact_gallery(), ids=[str(i) for i in range(NUM_ITEMS)]) | change
    with pytest.raises(UserError, match=message):
        retrieve.RetrievalServingModule(embedder, **arguments)


def test_saved_model_cli_lists_the_four_signatures(saved):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    shown = subprocess.run([*saved_model_cli(), "show", "--dir", saved["path"], "--all"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    chunks = re.split(r"signature_def\['(\w+)'\]:", shown.stdout)
    blocks = {name: body for name, body in zip(chunks[1::2], chunks[2::2])
              if "Method name is: tensorflow/serving/predict" in body}
    assert sorted(blocks) == sorted(["serving_default", "serve_image_bytes", "retrieve", "retrieve_embeddings"])
    tensor = r"\['{}'\] tensor_info:\s+dtype: {}\s+shape: \({}\)"
    expected_inputs = {"retrieve": [("image_bytes", "DT_STRING", "-1")],
                       "retrieve_embeddings": [("embedding", "DT_FLOAT", f"-1, {DIM}")]}
    for name, inputs in expected_inputs.items():
        for key, dtype, shape in [*inputs, ("k", "DT_INT32", "")]:
            assert re.search(tensor.format(key, dtype, shape), blocks[name]), blocks[name]
        for key, dtype in (("ids", "DT_STRING"), ("indices", "DT_INT64"), ("scores", "DT_FLOAT"),
                           ("distances", "DT_FLOAT")):
            assert re.search(tensor.format(key, dtype, "-1, -1"), blocks[name]), blocks[name]


def test_predict_request_carries_image_bytes_and_k(saved, images):
    signatures_ = saved["loaded"].signatures
    with prediction_service(signatures_) as stub:
        request = predict_request("catalogue", "retrieve", {"image_bytes": images[:3], "k": np.int32(4)})
        assert request.inputs["k"].dtype == tf.int32.as_datatype_enum
        assert not request.inputs["k"].tensor_shape.dim  # a scalar, as the signature takes it
        response = stub.Predict(request, timeout=60.0)
        direct = signatures_["retrieve"](image_bytes=tf.constant(images[:3]), k=tf.constant(4))
        for name in retrieve.OUTPUTS:
            np.testing.assert_array_equal(tf.make_ndarray(response.outputs[name]), direct[name].numpy())
        assert tf.make_ndarray(response.outputs["ids"]).shape == (3, 4)


def test_session_loader_runs_retrieve(saved, images):
    # TF Serving's C++ loader runs the graph in a session, without Python objects or pnpp_tf.
    expected = saved["loaded"].signatures["retrieve"](image_bytes=tf.constant(images), k=tf.constant(5))
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], saved["path"])
        signature = meta_graph.signature_def["retrieve"]
        feeds = {signature.inputs["image_bytes"].name: images, signature.inputs["k"].name: 5}
        found = session.run({name: signature.outputs[name].name for name in retrieve.OUTPUTS}, feeds)
    for name in retrieve.OUTPUTS:
        np.testing.assert_array_equal(found[name], expected[name].numpy())


def test_serving_module_for_the_export(embedder, tmp_path):
    assert type(retrieve.serving_module(embedder)) is signatures.EmbedderServingModule
    root = tmp_path / "photos"
    paths = [str(root / "shoes" / "a.jpg"), str(root / "b.png"), str(tmp_path / "elsewhere.jpg")]
    index = SearchIndex(exact_gallery()[:3], paths, {"images_root": str(root), "image_size": IMAGE_SIZE})
    index.save(str(tmp_path / "photos.npz"))
    module = retrieve.serving_module(embedder, MAX_PIXELS, str(tmp_path / "photos.npz"), max_k=2,
                                     dtype="float16", image_size=IMAGE_SIZE)
    assert isinstance(module, retrieve.RetrievalServingModule) and module.gallery.dtype == tf.float16
    assert [i.decode() for i in module.ids.numpy()] == ["shoes/a.jpg", "b.png", paths[2]]
    assert sorted(module.signatures()) == sorted(["serving_default", "serve_image_bytes", "retrieve",
                                                  "retrieve_embeddings"])
    # The TFLite model and its size estimate hold the embedder only; the SavedModel's, the gallery too.
    assert not {id(module.gallery), id(module.ids)} & {id(v) for v in module.model_variables}
    assert retrieve.saved_model_bytes(module) > retrieve.saved_model_bytes(retrieve.serving_module(embedder))
    with pytest.raises(UserError, match=r"--index=.*photos.npz holds embeddings of 32 px crops but the "
                                        r"model takes 64 px ones"):
        retrieve.serving_module(embedder, index_path=str(tmp_path / "photos.npz"), image_size=64)
    with pytest.raises(UserError, match=r"--index=.*missing.npz does not exist"):
        retrieve.serving_module(embedder, index_path=str(tmp_path / "missing.npz"))


def test_a_catalogue_index_is_served_as_its_exact_search_ranks(embedder, tmp_path):
    catalogue_lib = pytest.importorskip("pnpp_tf.retrieval.catalogue")
    from pnpp_tf.artifacts import load_embedder  # pylint: disable=import-outside-toplevel
    from pnpp_tf.retrieval.cataloguing import update_catalogue  # pylint: disable=import-outside-toplevel

    embedder.save(str(tmp_path / "embedder.keras"))
    rng = np.random.default_rng(9)
    for i in range(7):
        write_image(str(tmp_path / "photos" / f"shelf_{i % 2}" / f"item_{i}.{'png' if i % 3 else 'jpg'}"), rng)
    loaded_embedder = load_embedder(str(tmp_path / "embedder.keras"))
    update_catalogue(loaded_embedder, str(tmp_path / "photos"), str(tmp_path / "photos.index"), shard_size=3,
                     verbose=0)
    catalogue = catalogue_lib.Catalogue.open(str(tmp_path / "photos.index"))
    assert len(catalogue.shards) == 3
    module = retrieve.serving_module(embedder, MAX_PIXELS, str(tmp_path / "photos.index"), max_k=5,
                                     image_size=IMAGE_SIZE)
    assert [i.decode() for i in module.ids.numpy()] == catalogue.relative_paths()
    queries = np.random.default_rng(10).normal(size=(4, DIM)).astype(np.float32)
    distances, items, _ = catalogue.search(queries, k=5, backend="exact")
    found = module.retrieve_embeddings(tf.constant(queries), 5)
    np.testing.assert_array_equal(found["indices"].numpy(), items)
    np.testing.assert_allclose(found["distances"].numpy(), distances, atol=1e-6)
    # An image of the catalogue finds itself.
    first = catalogue.path(0)
    with open(first, "rb") as file:
        itself = module.retrieve(tf.constant([file.read()]), 1)
    assert itself["ids"].numpy()[0, 0].decode() == catalogue.relative_path(0)
    # A damaged shard would drop its items from the export: refused, named.
    os.remove(os.path.join(catalogue.shards[1].directory, "embeddings.npy"))
    with pytest.raises(UserError, match=r"--index=.*photos.index: shard\(s\) shard-\d+ are damaged .*pnpp_tf.index"):
        retrieve.serving_module(embedder, index_path=str(tmp_path / "photos.index"))
