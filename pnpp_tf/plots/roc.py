"""The ROC of pair decisions (`pnpp_tf.retrieval.calibration`) as a `ROC_SIZE`-pixel PNG."""

from pnpp_tf.plots.figures import new_figure, save_png

ROC_SIZE = (1100, 460)  # pixels, width x height


def save_roc(calibration, path, title=None):
    """TAR against FAR (log scale), and both against the threshold, with the chosen operating points.

    Args:
        calibration: `pnpp_tf.retrieval.calibration.calibrate`'s dict.
        path: the PNG to write.
        title: optional figure title.

    Returns:
        `path`; the image is `ROC_SIZE` pixels.
    """
    roc = calibration["roc"]
    negatives = calibration["other_class_pairs"]
    figure = new_figure(ROC_SIZE)
    curve_axes, threshold_axes = figure.subplots(1, 2)
    # FAR 0 has no place on a log axis: the curve starts at the least measurable rate.
    points = [(far, tar) for far, tar in zip(roc["false_accept_rate"], roc["true_accept_rate"]) if far > 0]
    if points:
        curve_axes.step([far for far, _ in points], [tar for _, tar in points], where="post", color="black")
        curve_axes.set_xscale("log")
        curve_axes.set_xlim(1.0 / negatives, 1.0)
    operating = [row for row in calibration["false_accept_rates"] if row["threshold"] is not None]
    for row in operating:
        label = (f"FAR {row['false_accept_rate']:g}: TAR {row['true_accept_rate']:.3f} at "
                 f"{row['threshold']:.4f}" + ("" if row["resolved"] else " (too few pairs)"))
        curve_axes.plot(max(row["measured_false_accept_rate"], 1.0 / negatives), row["true_accept_rate"],
                        "o", label=label)
    curve_axes.set_xlabel(f"false-accept rate ({negatives:,} other-class pairs)")
    curve_axes.set_ylabel(f"true-accept rate ({calibration['same_class_pairs']:,} same-class pairs)")
    curve_axes.set_ylim(0, 1.02)
    curve_axes.grid(alpha=0.3, which="both")
    if operating:
        curve_axes.legend(fontsize=8, loc="upper left")
    curve_axes.set_title("ROC of pairs: accept when cosine ≥ threshold")

    threshold_axes.plot(roc["threshold"], roc["true_accept_rate"], color="tab:green", label="true-accept rate")
    threshold_axes.plot(roc["threshold"], roc["false_accept_rate"], color="tab:red", label="false-accept rate")
    best = calibration["best_f1"]
    if best["threshold"] is not None:
        threshold_axes.axvline(best["threshold"], color="0.4", linestyle="--",
                               label=f"best F1 of the nearest neighbour ({best['f1']:.3f}) at {best['threshold']:.4f}")
    threshold_axes.set_xlabel("threshold (cosine similarity)")
    threshold_axes.set_ylabel("rate")
    threshold_axes.set_ylim(0, 1.02)
    threshold_axes.grid(alpha=0.3)
    threshold_axes.legend(fontsize=8, loc="lower left")
    threshold_axes.set_title("Rates by threshold")
    if title:
        figure.suptitle(title)
    save_png(figure, path)
    return path
