"""Match thresholds against brute force over every pair, ties included.

The exact tests use embeddings whose similarities float32 computes exactly on any CPU and in any
order: 16-d rows of +-1/4 (16 non-zeros) or +-1/2 (4 non-zeros), unit length, whose dot products
are multiples of 1/16. So the bins and the brute force see the same numbers, and there are ties
everywhere, across classes too.
"""

import numpy as np
import pytest

from pnpp_tf.errors import UserError
from pnpp_tf.retrieval import calibration
from pnpp_tf.retrieval.calibration import BINS_PER_UNIT, PairHistogram

RATES = (0.1, 1e-2, 1e-3, 1e-4)


def dyadic_embeddings(seed, n=90, classes=9):
    """Unit rows with exactly computable dot products, clustered by class, with duplicates."""
    rng = np.random.default_rng(seed)
    prototypes = rng.choice([-0.25, 0.25], size=(classes, 16))
    labels = rng.integers(0, classes, size=n)
    rows = prototypes[labels].copy()
    for row in rows:
        flips = rng.choice(16, size=rng.integers(0, 6), replace=False)
        row[flips] *= -1
    sparse = rng.random(n) < 0.2  # some rows of four +-1/2: other similarities, same grid
    for i in np.flatnonzero(sparse):
        rows[i] = 0
        rows[i, rng.choice(16, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    rows[5] = rows[6]  # a duplicate, whatever their classes
    rows[7] = rows[8]
    labels[8] = (labels[7] + 1) % classes  # one of another class: similarity 1 with no match
    return rows.astype(np.float32), labels


def brute_pairs(queries, q_labels, gallery=None, g_labels=None):
    """Every compared pair's similarity (float64) and whether it is same-class, by a plain loop."""
    sims, same = [], []
    for i in range(len(queries)):
        for j in (range(i + 1, len(queries)) if gallery is None else range(len(gallery))):
            other, other_label = (queries[j], q_labels[j]) if gallery is None else (gallery[j], g_labels[j])
            a, b = queries[i].astype(np.float64), other.astype(np.float64)
            sims.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            same.append(q_labels[i] == other_label)
    return np.array(sims), np.array(same)


def brute_rates(sims, same, rate):
    """The best TAR at FAR <= rate over the bin edges, trying each edge."""
    positives, negatives = sims[same], sims[~same]
    for index in range(PairHistogram.num_bins + 1):  # edges rise: the first one within budget
        threshold = index / BINS_PER_UNIT - 1.0
        false_accepts = int(np.sum(negatives >= threshold))
        if false_accepts <= np.floor(rate * len(negatives)):
            return threshold, int(np.sum(positives >= threshold)), false_accepts
    raise AssertionError("no edge")


def brute_nearest(queries, q_labels, gallery=None, g_labels=None):
    """Each query's nearest neighbour's similarity and correctness, lowest index on ties."""
    leave_one_out = gallery is None
    gallery, g_labels = (queries, q_labels) if leave_one_out else (gallery, g_labels)
    sims, correct = [], []
    for i, query in enumerate(queries.astype(np.float64)):
        best, best_j = -np.inf, None
        for j, row in enumerate(gallery.astype(np.float64)):
            if leave_one_out and j == i:
                continue
            s = query @ row / (np.linalg.norm(query) * np.linalg.norm(row))
            if s > best:
                best, best_j = s, j
        sims.append(best)
        correct.append(q_labels[i] == g_labels[best_j])
    return np.array(sims), np.array(correct)


def brute_f1(sims, correct):
    """The best F1 over every distinct similarity as the threshold, the highest on ties."""
    best = (-1.0, None)
    for threshold in sorted(set(sims.tolist()), reverse=True):
        accepted = sims >= threshold
        tp, fp, fn = np.sum(accepted & correct), np.sum(accepted & ~correct), np.sum(~accepted & correct)
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best[0]:
            best = (f1, threshold)
    return best


@pytest.mark.parametrize("split", ["leave_one_out", "query_gallery"])
def test_calibration_matches_brute_force_over_all_pairs(split):
    embeddings, labels = dyadic_embeddings(seed=1)
    if split == "leave_one_out":
        args = (embeddings, labels)
    else:
        gallery, gallery_labels = dyadic_embeddings(seed=2, n=70)
        args = (embeddings[:40], labels[:40], gallery, gallery_labels)
    found = calibration.calibrate(*args, false_accept_rates=RATES)

    sims, same = brute_pairs(*args)
    assert len(set(sims.tolist())) < 40  # ties everywhere: the test is about them
    assert found["same_class_pairs"] == int(same.sum())
    assert found["other_class_pairs"] == int((~same).sum())
    for row, rate in zip(found["false_accept_rates"], RATES):
        threshold, true_accepts, false_accepts = brute_rates(sims, same, rate)
        assert row["threshold"] == threshold
        assert row["true_accepts"] == true_accepts and row["false_accepts"] == false_accepts
        assert row["true_accept_rate"] == true_accepts / same.sum()
        assert row["resolved"] == (rate * (~same).sum() >= 1)

    f1, threshold = brute_f1(*brute_nearest(*args))
    assert found["best_f1"]["threshold"] == threshold
    assert found["best_f1"]["f1"] == pytest.approx(f1, rel=1e-12)


def test_histogram_does_not_depend_on_the_block():
    embeddings, labels = dyadic_embeddings(seed=3)
    whole = calibration.pair_histogram(embeddings, labels)
    for rows in (1, 7):
        blocked = calibration.pair_histogram(embeddings, labels, block_rows=rows)
        np.testing.assert_array_equal(blocked.same, whole.same)
        np.testing.assert_array_equal(blocked.other, whole.other)


def test_generic_embeddings_agree_with_float64_up_to_pairs_at_the_edge():
    """Random embeddings: float32 similarities differ from float64 ones by rounding, so a count
    may differ only by the pairs within that rounding (1e-5 is far above it) of the threshold."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 12, size=150)
    embeddings = (rng.normal(size=(12, 32))[labels] + rng.normal(size=(150, 32))).astype(np.float32)
    found = calibration.calibrate(embeddings, labels, false_accept_rates=RATES)
    sims, same = brute_pairs(embeddings, labels)
    for row in found["false_accept_rates"]:
        near = np.abs(sims - row["threshold"]) < 1e-5
        assert abs(row["true_accepts"] - np.sum(sims[same] >= row["threshold"])) <= np.sum(near & same)
        assert abs(row["false_accepts"] - np.sum(sims[~same] >= row["threshold"])) <= np.sum(near & ~same)
        # The bins cost at most the same-class pairs of one bin below the threshold.
        allowed = np.floor(row["false_accept_rate"] * (~same).sum())
        negatives = np.sort(sims[~same])[::-1]
        best = np.sum(sims[same] > negatives[int(allowed)]) if allowed < len(negatives) else same.sum()
        one_bin = np.sum(same & (sims >= row["threshold"] - 1.0 / BINS_PER_UNIT - 1e-5))
        assert row["true_accepts"] <= best + np.sum(near & same) and best <= one_bin + np.sum(near & same)


def test_roc_runs_from_all_accepted_to_none():
    embeddings, labels = dyadic_embeddings(seed=5)
    roc = calibration.calibrate(embeddings, labels)["roc"]
    assert roc["false_accept_rate"][0] == 1.0 and roc["true_accept_rate"][0] == 1.0
    assert roc["false_accept_rate"][-1] == 0.0
    assert np.all(np.diff(roc["false_accept_rate"]) <= 0) and np.all(np.diff(roc["true_accept_rate"]) <= 0)
    assert np.all(np.diff(roc["threshold"]) > 0)


def test_no_match_and_no_other_class():
    embeddings, _ = dyadic_embeddings(seed=6, n=20)
    one_class = calibration.calibrate(embeddings, np.zeros(20, int))
    assert one_class["other_class_pairs"] == 0
    assert all(row["threshold"] is None for row in one_class["false_accept_rates"])
    all_distinct = calibration.calibrate(embeddings, np.arange(20))
    assert all_distinct["best_f1"]["threshold"] is None
    assert all_distinct["best_f1"]["nearest_is_match"] == 0.0


def test_bad_rate_is_refused():
    embeddings, labels = dyadic_embeddings(seed=7, n=20)
    with pytest.raises(UserError, match="between 0 and 1, got 1.5"):
        calibration.calibrate(embeddings, labels, false_accept_rates=(1.5,))


def test_bins_count_exactly_the_scores_at_or_above_each_edge():
    """Scores on, just below and just above edges, and beyond [-1, 1] by rounding."""
    rng = np.random.default_rng(8)
    edges = rng.integers(1, PairHistogram.num_bins, size=50)
    on = (edges / BINS_PER_UNIT - 1.0).astype(np.float32)
    scores = np.concatenate([on, np.nextafter(on, np.float32(-2)), np.nextafter(on, np.float32(2)),
                             rng.uniform(-1, 1, 500).astype(np.float32),
                             np.float32([1.0, np.nextafter(np.float32(1), np.float32(2)), -1.0,
                                         np.nextafter(np.float32(-1), np.float32(-2))])])
    same = rng.random(len(scores)) < 0.5
    histogram = PairHistogram()
    histogram.add(scores, same)
    accepted_same, accepted_other = histogram.accepted()
    for index in list(edges) + [1, PairHistogram.num_bins - 1]:
        threshold = PairHistogram.edge(index)
        assert accepted_same[index] == np.sum(scores[same].astype(np.float64) >= threshold)
        assert accepted_other[index] == np.sum(scores[~same].astype(np.float64) >= threshold)
    assert accepted_same[0] + accepted_other[0] == len(scores)


def test_best_f1_takes_tied_similarities_together_and_the_highest_of_tied_scores():
    # F1 is 2/3 at 0.9 and at 0.3: the higher threshold is kept.
    found = calibration.best_f1([0.9, 0.5, 0.4, 0.3], [True, False, False, True])
    assert found["threshold"] == 0.9 and found["f1"] == pytest.approx(2 / 3)
    # Accepting 0.8 accepts both neighbours at 0.8, the wrong one too.
    found = calibration.best_f1([0.8, 0.8, 0.2], [True, False, True])
    assert (found["threshold"], found["accepted"]) == (0.2, 3)
    assert found["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1))
