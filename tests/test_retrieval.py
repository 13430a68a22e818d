"""Embedding image files (`ImageEmbedder`) and evaluation splits: one trace of the model serves
every evaluation."""

import gc
import weakref

import numpy as np
import pytest

from conftest import make_folder_dataset
from pnpp_tf.data.folder import read_folder_dataset
from pnpp_tf.data.pipeline import eval_dataset
from pnpp_tf.errors import UserError
from pnpp_tf.modeling.model import build_embedder
from pnpp_tf.retrieval.embed import ImageEmbedder
from pnpp_tf.retrieval.evaluator import RetrievalEvaluator

IMAGE_SIZE = 32


class CountingModel:
    """A model that counts its Python calls: inside a `tf.function` these happen only on tracing."""

    def __init__(self, model):
        self.model = model
        self.traces = 0

    def __call__(self, images, training=False):
        self.traces += 1
        return self.model(images, training=training)


class SlottedModel:
    """A callable model that cannot be weakly referenced (no `__weakref__` slot)."""

    __slots__ = ("model",)

    def __init__(self, model):
        self.model = model

    def __call__(self, images, training=False):
        return self.model(images, training=training)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = make_folder_dataset(tmp_path_factory.mktemp("retrieval") / "data", test_classes=3,
                               images_per_class=4, eval_dirs=("query", "gallery"))
    return read_folder_dataset(root)


def small_embedder(seed=0):
    import keras  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(seed)
    return build_embedder("small_cnn", IMAGE_SIZE, 16, weights="none")


def direct_embeddings(model, split):
    return np.concatenate([model(images, training=False).numpy()
                           for images in eval_dataset(split.paths, IMAGE_SIZE, batch_size=64)])


def test_repeated_measures_trace_the_model_once(splits):
    model = CountingModel(small_embedder())
    # 12 query and 12 gallery images in batches of 5: a smaller last batch in both.
    evaluator = RetrievalEvaluator(splits["query"], IMAGE_SIZE, (1, 2), gallery=splits["gallery"],
                                   batch_size=5)
    first = evaluator.measure(model)
    second = evaluator.measure(model, with_nmi=True)
    assert model.traces == 1
    assert {name: second[name] for name in first} == first
    # Another evaluator of the same model (e.g. evaluate.py after train.py) reuses the trace too.
    RetrievalEvaluator(splits["query"], IMAGE_SIZE, (1,), batch_size=7).measure(model)
    assert model.traces == 1


def test_embeddings_follow_weight_updates_without_retracing(splits):
    model = CountingModel(small_embedder())
    evaluator = RetrievalEvaluator(splits["query"], IMAGE_SIZE, (1,), batch_size=5)
    before, _ = evaluator.embed(model)
    np.testing.assert_allclose(before, direct_embeddings(model.model, splits["query"]), rtol=1e-4, atol=1e-4)
    # Training changes the variables' values; the traced function reads them when it runs.
    model.model.set_weights([w + 0.1 * np.sign(w) for w in model.model.get_weights()])
    after, gallery = evaluator.embed(model)
    assert gallery is None
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, direct_embeddings(model.model, splits["query"]), rtol=1e-4, atol=1e-4)
    assert model.traces == 1


def embed_files(model, split):
    return ImageEmbedder.of(model).embed_files(split.paths, batch_size=5, image_size=IMAGE_SIZE)


def test_each_model_is_traced_for_itself_and_not_kept_alive(splits):
    first, second = CountingModel(small_embedder(0)), CountingModel(small_embedder(1))
    first_embeddings = embed_files(first, splits["query"]).embeddings
    second_embeddings = embed_files(second, splits["query"]).embeddings
    assert (first.traces, second.traces) == (1, 1)
    assert ImageEmbedder.of(first) is first.image_embedder is not ImageEmbedder.of(second)
    assert not np.allclose(first_embeddings, second_embeddings)
    np.testing.assert_allclose(embed_files(first, splits["query"]).embeddings, first_embeddings)
    assert first.traces == 1
    # The trace it holds must not keep its model alive: a model dropped by its owner is freed.
    gone = weakref.ref(second)
    del second
    gc.collect()
    assert gone() is None


def test_models_without_weak_references_are_still_embedded(splits):
    embedder = small_embedder()
    found = embed_files(SlottedModel(embedder), splits["query"])
    got = found.embeddings
    assert got.dtype == np.float32 and got.shape == (len(splits["query"]), 16)
    assert found.paths == splits["query"].paths and found.skipped == []
    np.testing.assert_allclose(got, direct_embeddings(embedder, splits["query"]), rtol=1e-4, atol=1e-4)


def test_a_keras_model_holds_its_trace_outside_what_it_saves(splits, tmp_path):
    embedder = small_embedder()
    before = [w.copy() for w in embedder.get_weights()]
    found = embed_files(embedder, splits["query"])
    assert ImageEmbedder.of(embedder) is embedder.image_embedder
    np.testing.assert_array_equal(found.embeddings, embed_files(embedder, splits["query"]).embeddings)
    assert len(embedder.weights) == len(before) and "image_embedder" not in [layer.name for layer in embedder.layers]
    embedder.save(tmp_path / "embedder.keras")  # neither tracked nor saved
    import keras  # pylint: disable=import-outside-toplevel
    loaded = keras.saving.load_model(tmp_path / "embedder.keras")
    assert not hasattr(loaded, "image_embedder")


def test_an_evaluator_without_faults_names_a_bad_image(splits, tmp_path):
    import dataclasses  # pylint: disable=import-outside-toplevel
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    query = dataclasses.replace(splits["query"], paths=[str(broken)] + splits["query"].paths[1:])
    evaluator = RetrievalEvaluator(query, IMAGE_SIZE, (1,), batch_size=5)
    with pytest.raises(UserError, match=rf"^1 unreadable image\(s\) in the query images: {broken} \(empty file\)"):
        evaluator.measure(small_embedder())


class Normalising:
    """Stands in for a ProxyNCAModel: its output is L2-normalised, its `embedder`'s is raw."""

    def __init__(self, embedder):
        self.embedder = embedder

    def __call__(self, images, training=False):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        return tf.math.l2_normalize(self.embedder(images, training=training), axis=1)


def test_euclidean_measures_the_raw_embedding(splits):
    from pnpp_tf.retrieval.metrics import nmi, retrieval_metrics  # pylint: disable=import-outside-toplevel

    embedder = small_embedder(3)
    evaluator = RetrievalEvaluator(splits["query"], IMAGE_SIZE, ks=(1, 2), gallery=splits["gallery"],
                                   distance="euclidean")
    raw = [direct_embeddings(embedder, splits[name]) for name in ("query", "gallery")]
    # Rows of very different norms: on them the two distances rank differently.
    assert np.ptp(np.linalg.norm(raw[0], axis=1)) > 0
    want = retrieval_metrics(raw[0], splits["query"].labels, raw[1], splits["gallery"].labels,
                                        ks=(1, 2), distance="euclidean")
    want["nmi"] = nmi(np.concatenate(raw), np.concatenate(
        [splits["query"].labels, splits["gallery"].labels]), distance="euclidean")
    got = evaluator.measure(Normalising(embedder), with_nmi=True)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    cosine = evaluator.measure(Normalising(embedder), distance="cosine")
    want_cosine = retrieval_metrics(raw[0], splits["query"].labels, raw[1],
                                               splits["gallery"].labels, ks=(1, 2))
    for name, value in want_cosine.items():
        assert cosine[name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
def test_an_image_spoiled_between_measures_is_handed_to_the_faults(tmp_path, on_bad_image):
    import os  # pylint: disable=import-outside-toplevel
    from pnpp_tf.data.faults import ImageFaults  # pylint: disable=import-outside-toplevel
    from pnpp_tf.data.fingerprint import DataFingerprint  # pylint: disable=import-outside-toplevel

    root = make_folder_dataset(tmp_path / "data", test_classes=3, images_per_class=4)
    query = read_folder_dataset(root)["test"]
    faults = ImageFaults(DataFingerprint.of_splits({"query": query}, root), on_bad_image, max_pixels=10**8)
    faults.register("query", query.paths)
    model = CountingModel(small_embedder())
    evaluator = RetrievalEvaluator(query, IMAGE_SIZE, (1,), batch_size=5, faults=faults)
    evaluator.measure(model)
    # Overwritten with as many bytes and their times kept: the fingerprint sees no change, so only
    # the embedding pass, which left them out, names them.
    spoiled = [query.paths[5], query.paths[9]]
    for path in spoiled:
        state = os.stat(path)
        with open(path, "wb") as file:
            file.write(b"x" * state.st_size)
        os.utime(path, ns=(state.st_atime_ns, state.st_mtime_ns))
    if on_bad_image == "error":
        with pytest.raises(UserError, match=rf"^2 image\(s\) stopped reading during evaluation.*{spoiled[1]} \(Unknown"):
            evaluator.measure(model)
        return
    queries, _ = evaluator.embed(model)
    assert len(queries) == 10 and not set(spoiled) & set(evaluator.query.paths)
    assert [item["path"] for item in faults.skipped] == spoiled
    assert model.traces == 1
