"""Match thresholds: when is a neighbour the same item? Chosen on labelled data, in bounded memory.

    from pnpp_tf.retrieval import calibration
    found = calibration.calibrate(embeddings, labels)   # or with a query / gallery split
    found["false_accept_rates"][1]["threshold"]          # cosine at which 1 pair in 1,000 of
                                                         # different classes is accepted

Retrieval ranks; deduplication, product matching and verification decide. A decision here is
"accept the pair when its cosine similarity is at least t", on L2-normalised embeddings, the
similarity `pnpp_tf.search` and every export compute. Two views of it are measured:

- **Pairs** (`pair_histogram`): every pair the protocol compares (each unordered pair of distinct
  images of a leave-one-out split, or each query with each gallery image) is same-class (a true
  match) or not. The true-accept rate (TAR) at a false-accept rate (FAR) f is the largest share of
  same-class pairs accepted by a threshold accepting at most a share f of the other pairs. The
  pairs are never held: each block of rows' similarities is counted into two histograms, with
  `BINS_PER_UNIT` bins per unit of cosine. A bin is floor(s * BINS_PER_UNIT), exact in float32
  (the factor is a power of two), so the counts of pairs with s >= t are exact for every bin edge
  t = i / BINS_PER_UNIT: thresholds are those edges (a resolution of 6e-5), and TAR and FAR are
  the exact rates of the pairs at those thresholds, ties included.
- **The nearest neighbour** (`best_f1`): for each query, is its nearest neighbour (the one
  `pnpp_tf.retrieval.neighbours` finds, with its tie rule) a match? Accepting it when its
  similarity is at least t makes a true accept, a false accept, or a missed match; the threshold
  maximising F1 is searched over every distinct nearest-neighbour similarity, exactly.
"""

import numpy as np
from absl import logging

from pnpp_tf.errors import UserError
from pnpp_tf.retrieval import neighbours

FALSE_ACCEPT_RATES = (1e-2, 1e-3, 1e-4)
# A power of two, so that s * BINS_PER_UNIT is exact in float32 and bins have exact edges.
BINS_PER_UNIT = 1 << 14
# Scores computed and counted per block of rows: 2**23 float32 (32 MB), their bins as much again.
_BLOCK_SCORES = 1 << 23
# Points of the ROC kept in the results (the histogram has 32,769 thresholds).
_ROC_POINTS = 200


class PairHistogram:
    """Counts of same-class and other-class pair similarities, in bins of 1 / `BINS_PER_UNIT`.

    Bin i holds similarities s with edge(i) <= s < edge(i + 1), edge(i) = i / BINS_PER_UNIT - 1,
    for i in 0 .. 2 * BINS_PER_UNIT; the first bin also holds s < -1 and the last s >= 1, which
    only float32 rounding of unit vectors makes.

    Attributes:
        same, other: int64 counts per bin.
    """

    num_bins = 2 * BINS_PER_UNIT + 1

    def __init__(self):
        self.same = np.zeros(self.num_bins, np.int64)
        self.other = np.zeros(self.num_bins, np.int64)

    def add(self, scores, same, keep=None):
        """Counts `scores` (float32), each same-class where `same` (bool, same shape) is, and only
        where `keep` (bool, same shape) is, if given."""
        bins = np.multiply(scores, np.float32(BINS_PER_UNIT), dtype=np.float32)
        np.floor(bins, out=bins)
        np.clip(bins, -BINS_PER_UNIT, BINS_PER_UNIT, out=bins)
        index = bins.astype(np.int64) + BINS_PER_UNIT
        index += np.where(same, self.num_bins, 0)
        if keep is not None:
            index = np.where(keep, index, 2 * self.num_bins)  # a last bin, thrown away
        counts = np.bincount(index.ravel(), minlength=2 * self.num_bins + 1)
        self.other += counts[:self.num_bins]
        self.same += counts[self.num_bins:2 * self.num_bins]

    @staticmethod
    def edge(index):
        """The threshold of bin `index` (its lower edge): a cosine similarity."""
        return float(index) / BINS_PER_UNIT - 1.0

    def accepted(self):
        """(same, other): int64 arrays of `num_bins` + 1, the pairs of each kind with s >= edge(i)
        for each bin i, and last none (the threshold above every similarity)."""
        suffix = lambda counts: np.concatenate([np.cumsum(counts[::-1])[::-1], [0]])
        return suffix(self.same), suffix(self.other)


def pair_histogram(query_embeddings, query_labels, gallery_embeddings=None, gallery_labels=None,
                   block_rows=None, verbose=False):
    """The `PairHistogram` of every pair the protocol compares, one block of rows at a time.

    Args:
        query_embeddings: float `(N, D)`; L2-normalised here (`neighbours.unit_rows`).
        query_labels: int `(N,)`.
        gallery_embeddings, gallery_labels: optional `(M, D)` and `(M,)`: the pairs are then each
            query with each gallery row; without them each unordered pair of distinct queries.
        block_rows: query rows per block; None: as many as `_BLOCK_SCORES` scores allow.
        verbose: log progress.

    Returns:
        The `PairHistogram`.
    """
    queries = neighbours.unit_rows(query_embeddings, "query embeddings")
    query_labels = np.asarray(query_labels)
    leave_one_out = gallery_embeddings is None
    if leave_one_out:
        gallery, gallery_labels = queries, query_labels
    else:
        gallery = neighbours.unit_rows(gallery_embeddings, "gallery embeddings")
        gallery_labels = np.asarray(gallery_labels)
    rows = int(block_rows or max(1, _BLOCK_SCORES // len(gallery)))
    histogram = PairHistogram()
    for start in range(0, len(queries), rows):
        stop = min(start + rows, len(queries))
        # Leave-one-out: only the columns after each row, so that each pair counts once.
        first = start if leave_one_out else 0
        scores = queries[start:stop] @ gallery[first:].T
        same = query_labels[start:stop, None] == gallery_labels[None, first:]
        keep = None
        if leave_one_out:
            keep = np.arange(first, len(gallery))[None, :] > np.arange(start, stop)[:, None]
        histogram.add(scores, same, keep)
        if verbose:
            logging.info("Calibration: pairs of %d of %d rows counted", stop, len(queries))
    return histogram


def true_accept_rates(histogram, false_accept_rates=FALSE_ACCEPT_RATES):
    """The TAR at each FAR, and its threshold (see the module).

    Returns:
        One dict per rate: "false_accept_rate" (asked), "threshold" (the least bin edge whose FAR
        is at most the rate; None if there are no pairs of one kind), "true_accept_rate" and
        "measured_false_accept_rate" at it, "true_accepts" and "false_accepts" (pair counts), and
        "resolved": whether the other-class pairs are enough to measure the rate (at least
        1 / rate of them); if not, the threshold is the one with no false accept at all.
    """
    same, other = histogram.accepted()
    positives, negatives = int(same[0]), int(other[0])
    found = []
    for rate in false_accept_rates:
        rate = float(rate)
        if not 0 < rate < 1:
            raise UserError(f"A false-accept rate must be between 0 and 1, got {rate}.")
        row = {"false_accept_rate": rate, "resolved": bool(negatives * rate >= 1)}
        if not positives or not negatives:
            row.update(threshold=None, true_accept_rate=None, measured_false_accept_rate=None,
                       true_accepts=None, false_accepts=None)
        else:
            allowed = np.floor(rate * negatives)
            # `other` falls from bin to bin: the first bin within the budget accepts the most.
            index = int(np.argmax(other <= allowed))
            row.update(threshold=PairHistogram.edge(index),  # past the last bin: accept none
                       true_accept_rate=int(same[index]) / positives,
                       measured_false_accept_rate=int(other[index]) / negatives,
                       true_accepts=int(same[index]), false_accepts=int(other[index]))
        found.append(row)
    return found


def best_f1(similarities, correct):
    """The threshold that best decides whether each query's nearest neighbour is a match.

    Accepting a neighbour with similarity >= t counts a true accept if it is a match, a false one
    if not; a match not accepted is missed. Every distinct similarity is tried as t.

    Args:
        similarities: float `(Q,)`, each query's similarity to its nearest neighbour.
        correct: bool `(Q,)`, whether that neighbour is of the query's class.

    Returns:
        {"threshold", "f1", "precision", "recall", "accepted"} at the best F1 (the highest such
        threshold when several tie; all None when no neighbour is a match), and
        "nearest_is_match": the share of queries whose neighbour is a match (Recall@1).
    """
    similarities = np.asarray(similarities, np.float64)
    correct = np.asarray(correct, bool)
    matches = int(correct.sum())
    result = {"nearest_is_match": matches / len(correct) if len(correct) else None}
    if not matches:
        return {**result, "threshold": None, "f1": None, "precision": None, "recall": None,
                "accepted": None}
    order = np.argsort(-similarities, kind="stable")
    ranked, hits = similarities[order], correct[order]
    true_accepts = np.cumsum(hits)
    # Accepting s >= t takes every tie of t: only the last of a run of equal values is a choice.
    last = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    accepted = last + 1
    f1 = 2 * true_accepts[last] / (accepted + matches)
    best = int(np.argmax(f1))  # the first maximum: the highest threshold
    tp, taken = int(true_accepts[last[best]]), int(accepted[best])
    return {**result, "threshold": float(ranked[last[best]]), "f1": float(f1[best]),
            "precision": tp / taken, "recall": tp / matches, "accepted": taken}


def calibrate(query_embeddings, query_labels, gallery_embeddings=None, gallery_labels=None,
              false_accept_rates=FALSE_ACCEPT_RATES, backend="exact", block_size=None, verbose=False):
    """Match thresholds for embeddings of known classes (see the module).

    Args:
        query_embeddings, query_labels, gallery_embeddings, gallery_labels: as
            `pnpp_tf.retrieval.metrics.retrieval_metrics` takes them (without a gallery, each
            query is compared with all other queries).
        false_accept_rates: the FARs at which to report the TAR.
        backend, block_size: of the nearest-neighbour search (`neighbours.blocks`).
        verbose: log progress.

    Returns:
        {"similarity": "cosine", "same_class_pairs", "other_class_pairs", "bins_per_unit",
        "false_accept_rates": `true_accept_rates`'s rows, "best_f1": `best_f1`'s dict, "roc":
        the ROC at about 200 thresholds, log-spaced in FAR}.
    """
    histogram = pair_histogram(query_embeddings, query_labels, gallery_embeddings, gallery_labels,
                               verbose=verbose)
    queries = neighbours.unit_rows(query_embeddings, "query embeddings")
    labels = np.asarray(query_labels)
    if gallery_embeddings is None:
        gallery, gallery_labels, exclude = queries, labels, np.arange(len(queries))
    else:
        gallery, exclude = neighbours.unit_rows(gallery_embeddings, "gallery embeddings"), None
    backend = neighbours.choose_backend(backend, len(gallery))
    sims, found = neighbours.nearest(queries, gallery, 1, exclude, backend, block_size)
    nearest_f1 = best_f1(sims[:, 0], np.asarray(gallery_labels)[found[:, 0]] == labels)
    same, other = histogram.accepted()
    return {
        "similarity": "cosine",
        "same_class_pairs": int(same[0]),
        "other_class_pairs": int(other[0]),
        "bins_per_unit": BINS_PER_UNIT,
        "false_accept_rates": true_accept_rates(histogram, false_accept_rates),
        "best_f1": nearest_f1,
        "roc": _roc(same, other),
    }


def _roc(same, other, points=_ROC_POINTS):
    """The ROC at about 1.25 `points` thresholds: spaced evenly in log FAR from 1 / (other-class
    pairs) to 1, a quarter of them evenly in FAR, and the one accepting none.

    Returns:
        {"threshold", "false_accept_rate", "true_accept_rate"}: lists, thresholds rising.
    """
    if not same[0] or not other[0]:
        return {"threshold": [], "false_accept_rate": [], "true_accept_rate": []}
    # Log-spaced where a threshold is chosen, and some evenly spaced ones for the lenient end.
    budgets = np.concatenate([[0.0], np.geomspace(1.0, float(other[0]), points),
                              np.linspace(0.0, float(other[0]), points // 4)])
    # For each budget of false accepts, the first (most accepting) edge within it, as above.
    index = np.unique(np.searchsorted(-other, -np.floor(budgets), side="left"))
    return {"threshold": [PairHistogram.edge(i) for i in index],
            "false_accept_rate": (other[index] / other[0]).tolist(),
            "true_accept_rate": (same[index] / same[0]).tolist()}
