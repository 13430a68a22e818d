"""The ProxyNCA(++) loss against a naive, obviously-correct numpy loop: values and gradients."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import rows_to_normalise
from pnpp_tf.modeling.losses import ProxyNCALoss


def naive_loss(embeddings, proxies, labels, temperature, variant):
    """Loops over examples and proxies in float64, as the paper defines the loss (Teh et al., ECCV
    2020, arXiv 2004.01113: NCA over proxies, distances of unit vectors over a temperature) and
    the authors' code computes it (github.com/euwern/proxynca_pp: squared distances of unit
    vectors divided by T; ++ keeps the positive proxy in the softmax, ProxyNCA leaves it out)."""
    def unit(v):
        return v / max(np.linalg.norm(v), 1e-12)

    total = 0.0
    for x, y in zip(embeddings, labels):
        logits = [-np.sum((unit(x) - unit(p)) ** 2) / temperature for p in proxies]
        if variant == "proxynca_pp":
            denominator = sum(np.exp(l) for l in logits)
        else:
            denominator = sum(np.exp(l) for c, l in enumerate(logits) if c != y)
        total += -np.log(np.exp(logits[y]) / denominator)
    return total / len(labels)


def numeric_gradient(f, x, step=1e-6):
    gradient = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        gradient[index] = (f(plus) - f(minus)) / (2 * step)
    return gradient


@pytest.mark.parametrize("variant", ["proxynca_pp", "proxynca"])
@pytest.mark.parametrize("temperature", [1.0 / 9.0, 1.0])
def test_loss_value_and_gradients_match_naive_loop(variant, temperature):
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(6, 5))
    labels = np.array([0, 1, 2, 3, 0, 2])
    layer = ProxyNCALoss(4, 5, temperature=temperature, variant=variant)
    proxies = layer.proxies.numpy().astype(np.float64)

    x = tf.Variable(embeddings, dtype=tf.float32)
    with tf.GradientTape() as tape:
        loss = layer(x, labels)
    grad_x, grad_p = tape.gradient(loss, [x, layer.proxies])

    expected = naive_loss(embeddings, proxies, labels, temperature, variant)
    assert loss.dtype == tf.float32 and loss.shape == ()
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        grad_x.numpy(),
        numeric_gradient(lambda e: naive_loss(e, proxies, labels, temperature, variant), embeddings),
        rtol=1e-3, atol=1e-4,
    )
    np.testing.assert_allclose(
        grad_p.numpy(),
        numeric_gradient(lambda p: naive_loss(embeddings, p, labels, temperature, variant), proxies),
        rtol=1e-3, atol=1e-4,
    )


def test_proxynca_pp_is_cross_entropy_on_cosine_logits():
    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(8, 16)).astype(np.float32)
    labels = rng.integers(0, 10, size=8)
    layer = ProxyNCALoss(10, 16)
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    p = layer.proxies.numpy() / np.linalg.norm(layer.proxies.numpy(), axis=1, keepdims=True)
    cross_entropy = tf.keras.losses.sparse_categorical_crossentropy(labels, 18.0 * x @ p.T, from_logits=True)
    np.testing.assert_allclose(layer(embeddings, labels).numpy(), np.mean(cross_entropy), rtol=1e-5)


def test_proxies_are_initialised_normal_over_eight():
    layer = ProxyNCALoss(200, 512)
    assert layer.proxies.shape == (200, 512)
    assert layer.proxies.trainable
    assert abs(np.std(layer.proxies.numpy()) - 1.0 / 8.0) < 0.005
    assert abs(np.mean(layer.proxies.numpy())) < 0.005


def test_loss_is_float32_under_mixed_precision_inputs():
    layer = ProxyNCALoss(5, 8)
    embeddings = tf.random.normal([4, 8], dtype=tf.float16)
    loss = layer(embeddings, np.array([0, 1, 2, 3]))
    assert loss.dtype == tf.float32 and np.isfinite(loss.numpy())


@pytest.fixture
def float64_policy():
    import keras  # pylint: disable=import-outside-toplevel

    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_dtype_policy(before)


def test_loss_is_float64_under_a_float64_policy(float64_policy):  # pylint: disable=unused-argument,redefined-outer-name
    """tools/parity_with_reference.py --dtype=float64: the loss, its proxies and logits in float64,
    agreeing with the naive float64 loop to float64 rounding, far below float32's."""
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(6, 5))
    labels = np.array([0, 1, 2, 3, 0, 2])
    layer = ProxyNCALoss(4, 5)
    loss = layer(tf.constant(embeddings, tf.float64), labels)
    assert layer.proxies.dtype == "float64" and loss.dtype == tf.float64
    expected = naive_loss(embeddings, layer.proxies.numpy(), labels, 1.0 / 9.0, "proxynca_pp")
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12)


def test_zero_embedding_has_finite_gradient():
    layer = ProxyNCALoss(3, 4)
    x = tf.Variable(tf.zeros([2, 4]))
    with tf.GradientTape() as tape:
        loss = layer(x, np.array([0, 1]))
    assert np.all(np.isfinite(tape.gradient(loss, x).numpy()))


@pytest.mark.parametrize("bad_label", [-1, 5])
def test_out_of_range_labels_raise(bad_label):
    layer = ProxyNCALoss(5, 8)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        layer(tf.random.normal([2, 8]), np.array([0, bad_label]))


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="variant"):
        ProxyNCALoss(5, 8, variant="proxy_anchor")
    with pytest.raises(ValueError, match="temperature"):
        ProxyNCALoss(5, 8, temperature=0.0)


def test_config_round_trip():
    layer = ProxyNCALoss(7, 3, temperature=0.5, variant="proxynca")
    clone = ProxyNCALoss.from_config(layer.get_config())
    assert (clone.num_classes, clone.embedding_dim, clone.temperature, clone.variant) == (7, 3, 0.5, "proxynca")


def test_l2_normalize_is_the_naive_normaliser_and_the_engines():
    from pnpp_tf.retrieval import neighbours  # pylint: disable=import-outside-toplevel
    from pnpp_tf.modeling.losses import l2_normalize  # pylint: disable=import-outside-toplevel

    x, want = rows_to_normalise(seed=3)
    got = l2_normalize(tf.constant(x, tf.float32)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # The k-NN engine's numpy normaliser computes the same function.
    np.testing.assert_allclose(neighbours.unit_rows(x), got, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(l2_normalize(tf.constant(x.T, tf.float32), axis=0).numpy(),
                               want.T, rtol=1e-6, atol=1e-7)
