"""Embedding evaluation splits: one trace of the model serves every evaluation."""

import gc
import weakref

import numpy as np
import pytest

from conftest import make_folder_dataset
from pnpp_tf.data.folder import read_folder_dataset
from pnpp_tf.data.pipeline import eval_dataset
from pnpp_tf.modeling.model import build_embedder
from pnpp_tf.retrieval.embed import embed_images
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


def test_each_model_is_traced_for_itself_and_not_kept_alive(splits):
    dataset = eval_dataset(splits["query"].paths, IMAGE_SIZE, batch_size=5)
    first, second = CountingModel(small_embedder(0)), CountingModel(small_embedder(1))
    first_embeddings = embed_images(first, dataset, len(splits["query"]))
    second_embeddings = embed_images(second, dataset, len(splits["query"]))
    assert (first.traces, second.traces) == (1, 1)
    assert not np.allclose(first_embeddings, second_embeddings)
    np.testing.assert_allclose(embed_images(first, dataset, len(splits["query"])), first_embeddings)
    assert first.traces == 1
    # The cached function must not hold its model: a model dropped by its owner is freed.
    gone = weakref.ref(second)
    del second
    gc.collect()
    assert gone() is None


def test_models_without_weak_references_are_still_embedded(splits):
    embedder = small_embedder()
    dataset = eval_dataset(splits["query"].paths, IMAGE_SIZE, batch_size=5)
    got = embed_images(SlottedModel(embedder), dataset, len(splits["query"]))
    assert got.dtype == np.float32 and got.shape == (len(splits["query"]), 16)
    np.testing.assert_allclose(got, direct_embeddings(embedder, splits["query"]), rtol=1e-4, atol=1e-4)


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
