"""The pictures of a training run and of eval (matplotlib, headless): training's losses and validation
metrics (training_curves.png) and TIE's block importance (tie_block_importance.png); eval's ROC and
precision-recall curves, reliability diagram, and the robustness curves of a perturbation sweep.
Without this package training and eval still write their checkpoints and tables, and say so in one line.
"""

import csv
from pathlib import Path

import numpy as np

from rine_plus_ssca import ECE_BINS, METRIC_COLUMNS, expected_calibration_error, reliability_bins


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history, loss_rows, steps_per_epoch, path):
    """Left: the training losses by step (train_log.csv) and the validation BCE at each epoch's end; right:
    validation accuracy, AP and AUC per epoch. Markers and line styles differ, so equal curves stay visible."""
    plt = _pyplot()
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [row["run_step"] for row in loss_rows]
    loss_axis.plot(steps, [row["train_bce"] for row in loss_rows], "-", label="train BCE / image")
    loss_axis.plot(steps, [row["train_supcon"] for row in loss_rows], "--", label="train SupCon")
    loss_axis.plot([m["epoch"] * steps_per_epoch for m in history], [m["val_bce"] for m in history], "ko:",
                   label="val BCE / image (epoch end)")
    loss_axis.set(xlabel="step", ylabel="loss", title="losses")
    loss_axis.legend()
    epochs = [m["epoch"] for m in history]
    for (key, style) in (("acc", "o-"), ("ap", "s--"), ("auc", "^:")):
        metric_axis.plot(epochs, [m[key] for m in history], style, label=f"val {key}", alpha=0.8)
    metric_axis.set(xlabel="epoch", ylim=(0, 1.02), title="validation", xticks=epochs)
    metric_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_block_importance(model, path):
    """TIE importance per block (softmax(alpha) averaged over channels), RINE's figure."""
    plt = _pyplot()
    weights = model.block_importance().numpy()
    figure, axis = plt.subplots(figsize=(max(5, 0.35 * len(weights)), 3.5))
    axis.bar([str(b) for b in model.backbone.blocks], weights)
    axis.axhline(1.0 / len(weights), color="gray", linestyle="--", label="uniform")
    axis.set(xlabel="CLIP block", ylabel="importance", title="TIE block importance")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def read_loss_log(path):
    """train_log.csv's rows as dicts of numbers ([] when there is none)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


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
