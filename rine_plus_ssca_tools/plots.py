"""The pictures eval writes next to its tables: ROC and precision-recall curves, the reliability diagram,
and the robustness curves of a perturbation sweep. Training's own pictures (training_curves.png,
tie_block_importance.png) are drawn by the script, so a training run writes them without this package.
"""

import numpy as np

from rine_plus_ssca import ECE_BINS, METRIC_COLUMNS, _pyplot, expected_calibration_error, reliability_bins


def plot_roc_pr(labels, probs, path):
    """ROC and precision-recall curves over all scored images."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _pyplot()
    figure, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(9, 4))
    if len(set(labels.tolist())) == 2:
        fpr, tpr, _ = roc_curve(labels, probs)
        precision, recall, _ = precision_recall_curve(labels, probs)
        roc_axis.plot(fpr, tpr)
        pr_axis.plot(recall, precision)
    roc_axis.plot([0, 1], [0, 1], color="gray", linestyle="--")
    roc_axis.set(xlabel="false positive rate (reals called fake)", ylabel="true positive rate", title="ROC")
    pr_axis.set(xlabel="recall (fakes found)", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_reliability(labels, curves, path, n_bins=ECE_BINS):
    """Reliability diagram of all scored images pooled: per bin of P(fake), the fraction of fakes against the
    mean P(fake) (on the diagonal when calibrated), and below it the images per bin.
    curves: {name: P(fake) of the images}, e.g. the calibrated and the raw P(fake)."""
    plt = _pyplot()
    figure, (curve_axis, count_axis) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                                    gridspec_kw={"height_ratios": [3, 1.3]})
    curve_axis.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfectly calibrated")
    width = 1.0 / n_bins / len(curves)
    for number, (name, probs) in enumerate(curves.items()):
        counts, mean_p, fraction_fake = reliability_bins(labels, probs, n_bins)
        filled = counts > 0
        ece = expected_calibration_error(labels, probs, n_bins)
        curve_axis.plot(mean_p[filled], fraction_fake[filled], marker="o", color=f"C{number}",
                        label=f"{name} (binary ECE {ece:.3f})")
        bars = count_axis.bar(np.arange(n_bins) / n_bins + (number + 0.5) * width, counts, width=width,
                              color=f"C{number}", label=name)
        count_axis.bar_label(bars, labels=[str(n) if n else "" for n in counts], fontsize=7)
    curve_axis.set(ylabel="fraction of fakes", xlim=(0, 1), ylim=(-0.02, 1.02),
                   title=f"reliability ({len(labels)} images, {n_bins} bins of P(fake))")
    curve_axis.legend(loc="upper left")
    count_axis.set(xlabel="P(fake)", ylabel="images per bin")
    count_axis.margins(y=0.25)  # room for the counts above the bars
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


ROBUSTNESS_LEVEL_NAMES = {"jpeg": "JPEG quality", "blur": "blur sigma", "resize": "resize factor"}


def plot_robustness(kind, levels, mean_rows, clean_row, path):
    """Mean accuracy and AP against the perturbation level, the clean result dashed."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4))
    acc_index, ap_index = 1 + METRIC_COLUMNS.index("acc"), 1 + METRIC_COLUMNS.index("ap")
    for index, name, color in ((acc_index, "accuracy", "C0"), (ap_index, "AP", "C1")):
        axis.plot([str(level) for level in levels], [row[index] for row in mean_rows], marker="o", color=color, label=name)
        axis.axhline(clean_row[index], color=color, linestyle="--", alpha=0.6, label=f"{name}, clean")
    axis.set(xlabel=ROBUSTNESS_LEVEL_NAMES[kind], ylim=(0, 1.02), title=f"robustness to {kind}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_differences(results, names, path):
    """compare's picture: per row and for the mean, the difference A - B of each metric with its interval."""
    from rine_plus_ssca_tools.statistics import METRICS

    plt = _pyplot()
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 0.5 * len(results) + 1.8), sharey=True)
    labels = [result["row"] for result in results]
    for axis, metric in zip(axes, METRICS):
        for y, result in enumerate(results):
            m = result[metric]
            if m["difference"] != m["difference"]:  # NaN: a one-class row has no AP or AUC
                continue
            low, high = m["interval"]
            # a percentile interval need not contain the point estimate: draw the bar from low to high
            axis.errorbar(m["difference"], y, xerr=[[max(0.0, m["difference"] - low)], [max(0.0, high - m["difference"])]],
                          fmt="o", color="C3" if result["row"].startswith("mean (") else "C0", capsize=3)
            axis.hlines(y, low, high, color="C3" if result["row"].startswith("mean (") else "C0")
        axis.axvline(0, color="grey", linestyle="--")
        axis.set(title=f"{metric}: {names[0]} - {names[1]}", xlabel="difference (95% interval)")
    axes[0].set_yticks(range(len(labels)), labels)
    axes[0].invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
