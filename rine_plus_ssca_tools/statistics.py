"""How sure is a figure? Bootstrap intervals over images, over seeds and images together, and McNemar's test.

Used by `eval` (an interval beside each row's ACC, AP and AUC) and by `compare` (is A better than B on
the same images?). The intervals cover the sampling of the test images only; the spread over training
seeds is a separate figure (mean +- std over checkpoints), and compare's group interval resamples both.

The metrics are written with NumPy here (they agree with scikit-learn's, which the tests check) because
a bootstrap computes them thousands of times.
"""

import csv
import math
from pathlib import Path

import numpy as np
from scipy.stats import binom, rankdata

import rine_plus_ssca as rps

METRICS = ("acc", "ap", "auc")  # the figures that get intervals
CONFIDENCE = 0.95


def average_precision(labels, scores):
    """AP as scikit-learn's average_precision_score: sum over thresholds of (recall gain) x precision,
    tied scores forming one threshold."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_each_score]
    precision = true_positives / (last_of_each_score + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(labels, scores):
    """ROC AUC as the Mann-Whitney statistic: the chance that a random fake scores above a random real
    (ties count half), equal to scikit-learn's roc_auc_score."""
    ranks = rankdata(scores)
    n_fake = labels.sum()
    n_real = len(labels) - n_fake
    return float((ranks[labels == 1].sum() - n_fake * (n_fake + 1) / 2) / (n_fake * n_real))


def metric_values(labels, probs, threshold=0.5, strict=False):
    """(acc, ap, auc) of one set of scores; AP and AUC are NaN unless both classes are present."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    acc = float((rps.called_fake(probs, threshold, strict) == (labels == 1)).mean())
    if labels.min() == labels.max():
        return acc, math.nan, math.nan
    return acc, average_precision(labels, probs), roc_auc(labels, probs)


def stratified_resample(labels, rng):
    """Positions of one bootstrap resample that keeps each class's count: every resample holds both
    classes whenever the row does, so AP and AUC always exist."""
    positions = [np.flatnonzero(labels == label) for label in (0, 1)]
    return np.concatenate([members[rng.integers(0, len(members), len(members))] for members in positions
                           if len(members)])


def bootstrap_draws(labels, probs_per_model, rules, n_resamples, rng):
    """[n_resamples, n_models, 3] metric values (METRICS) of every model on the same resampled images:
    the models are paired by image, as all scores of one row are. rules: each model's (threshold, strict)."""
    labels = np.asarray(labels).astype(int)
    draws = np.empty((n_resamples, len(probs_per_model), len(METRICS)))
    for r in range(n_resamples):
        chosen = stratified_resample(labels, rng)
        for m, (probs, (threshold, strict)) in enumerate(zip(probs_per_model, rules)):
            draws[r, m] = metric_values(labels[chosen], np.asarray(probs)[chosen], threshold, strict)
    return draws


def percentile_interval(values, confidence=CONFIDENCE):
    """The central `confidence` share of the bootstrap values: (low, high), NaN when undefined."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def table_intervals(rows, threshold, strict, n_resamples=1000, seed=0, confidence=CONFIDENCE):
    """Intervals for one model's eval table.

    rows: [(row name, labels, P(fake))] in table order. Returns [(row name, {metric: (low, high)})] with,
    last, the mean row over the rows holding both classes (each resample draws within every row and
    averages the rows' metrics, as the table's mean row does), named as in the table.
    """
    rng = np.random.default_rng(seed)
    draws_of = {name: bootstrap_draws(labels, [probs], [(threshold, strict)], n_resamples, rng)[:, 0]
                for name, labels, probs in rows}
    result = [(name, {metric: percentile_interval(draws_of[name][:, k], confidence) for k, metric in enumerate(METRICS)})
              for name, _, _ in rows]
    both = [name for name, labels, _ in rows if len(set(np.asarray(labels).tolist())) == 2]
    if both:
        mean_draws = np.mean([draws_of[name] for name in both], axis=0)
        result.append((f"mean ({len(both)} generator{'s' if len(both) > 1 else ''})",
                       {metric: percentile_interval(mean_draws[:, k], confidence) for k, metric in enumerate(METRICS)}))
    return result


def mcnemar_exact(correct_a, correct_b):
    """McNemar's exact test for two classifiers on the same images: (images only A gets right, images only B
    gets right, two-sided p-value of the binomial test of those discordant counts at 1/2)."""
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((correct_a & ~correct_b).sum()), int((~correct_a & correct_b).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return only_a, only_b, 1.0
    return only_a, only_b, float(min(1.0, 2 * binom.cdf(min(only_a, only_b), discordant, 0.5)))


def compare_groups(rows, group_a, group_b, rules_a, rules_b, n_resamples=1000, seed=0, confidence=CONFIDENCE):
    """A against B on the same images, per row and for the mean row.

    rows: [(row name, labels)]; group_a / group_b: one list per checkpoint of [P(fake) per row] (the same
    images, in the same order); rules_a / rules_b: each checkpoint's (threshold, strict). Each bootstrap resample draws the images (stratified, the same images for
    every checkpoint: the comparison is paired) and, for a group of several checkpoints, the checkpoints
    (with replacement: the seeds' spread enters the interval). Returns one dict per row, then the mean row:
    name, for each metric the groups' means and standard deviations over checkpoints, the difference of
    the means (A - B) and its interval, and McNemar's p-value for the accuracy (the largest over the pairs
    A_i, B_i when the groups hold several checkpoints: the least significant pair).
    """
    rng = np.random.default_rng(seed)
    n_a, n_b = len(group_a), len(group_b)
    seeds_a = rng.integers(0, n_a, (n_resamples, n_a)) if n_a > 1 else np.zeros((n_resamples, 1), int)
    seeds_b = rng.integers(0, n_b, (n_resamples, n_b)) if n_b > 1 else np.zeros((n_resamples, 1), int)
    results, differences_per_row, point_a, point_b = [], [], [], []
    for index, (name, labels) in enumerate(rows):
        labels = np.asarray(labels).astype(int)
        probs_a = [np.asarray(model[index]) for model in group_a]
        probs_b = [np.asarray(model[index]) for model in group_b]
        values_a = np.array([metric_values(labels, p, *rule) for p, rule in zip(probs_a, rules_a)])  # [n_a, 3]
        values_b = np.array([metric_values(labels, p, *rule) for p, rule in zip(probs_b, rules_b)])
        draws = bootstrap_draws(labels, probs_a + probs_b, list(rules_a) + list(rules_b), n_resamples, rng)
        draws_a, draws_b = draws[:, :n_a], draws[:, n_a:]
        differences = (np.take_along_axis(draws_a, seeds_a[:, :, None], 1).mean(1)
                       - np.take_along_axis(draws_b, seeds_b[:, :, None], 1).mean(1))  # [n_resamples, 3]
        pairs = [mcnemar_exact(rps.called_fake(pa, *rule_a) == (labels == 1), rps.called_fake(pb, *rule_b) == (labels == 1))
                 for pa, pb, rule_a, rule_b in zip(probs_a, probs_b, rules_a, rules_b)]
        results.append(_comparison_row(name, len(labels), values_a, values_b, differences, confidence,
                                       max(p for _, _, p in pairs)))
        if labels.min() != labels.max():
            differences_per_row.append(differences)
            point_a.append(values_a)
            point_b.append(values_b)
    if differences_per_row:
        n = len(differences_per_row)
        results.append(_comparison_row(f"mean ({n} generator{'s' if n > 1 else ''})", None, np.mean(point_a, axis=0),
                                       np.mean(point_b, axis=0), np.mean(differences_per_row, axis=0), confidence, None))
    return results


def _comparison_row(name, n_images, values_a, values_b, differences, confidence, mcnemar_p):
    """One row of compare_groups' result (values_*: [checkpoints, 3]; differences: [n_resamples, 3])."""
    row = {"row": name, "images": n_images, "mcnemar_p": mcnemar_p}
    for k, metric in enumerate(METRICS):
        a, b = values_a[:, k], values_b[:, k]
        row[metric] = {
            "a_mean": float(np.mean(a)), "a_std": float(np.std(a, ddof=1)) if len(a) > 1 else math.nan,
            "b_mean": float(np.mean(b)), "b_std": float(np.std(b, ddof=1)) if len(b) > 1 else math.nan,
            "difference": float(np.mean(a) - np.mean(b)),
            "interval": percentile_interval(differences[:, k], confidence),
        }
    return row


def interval_table(intervals, table_rows):
    """eval's interval table: (columns, rows) with each metric's low and high end, in the order of the
    metrics table's rows (a one-class row is matched under its plain name)."""
    by_name = dict(intervals)
    columns = ["row"] + [f"{metric}_{end}" for metric in METRICS for end in ("low", "high")]
    rows = []
    for row in table_rows:
        name = row[0].replace(" (fakes only)", "").replace(" (reals only)", "")
        if name in by_name:
            rows.append([row[0]] + [value for metric in METRICS for value in by_name[name][metric]])
    return columns, rows


SUMMARY_METRICS = ("acc", "real_acc", "fake_acc", "ap", "auc")


def seed_summary_rows(tables):
    """Mean and standard deviation over checkpoints of each row's metrics: (columns, rows with the condition
    first). tables: evaluate_checkpoint's results, scored on the same images."""
    first = tables[0]["csv_rows"]
    for table in tables[1:]:
        if [row[:4] for row in table["csv_rows"]] != [row[:4] for row in first]:
            raise rps.UserError(f"{table['checkpoint']} was scored on other images than {tables[0]['checkpoint']} "
                                "(rows or counts differ); evaluate checkpoints of the same data together.")
    index = {name: 2 + rps.METRIC_COLUMNS.index(name) for name in SUMMARY_METRICS}  # after condition, generator
    columns = ["condition", "generator", "n_real", "n_fake"] + [f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std")]
    rows = []
    for position, row in enumerate(first):
        values = {m: np.array([table["csv_rows"][position][index[m]] for table in tables], dtype=np.float64)
                  for m in SUMMARY_METRICS}
        summary = []
        for m in SUMMARY_METRICS:
            summary += [_nan_mean(values[m]), _nan_std(values[m])]
        rows.append(row[:4] + summary)
    return columns, rows


def _nan_mean(values):
    return math.nan if np.isnan(values).all() else float(np.nanmean(values))


def _nan_std(values):
    kept = values[~np.isnan(values)]
    return float(np.std(kept, ddof=1)) if len(kept) > 1 else math.nan


def write_seed_summary(args, tables, out_dir, stem):
    """Print and write (CSV, Markdown) mean +- std per row over eval's checkpoints."""
    columns, rows = seed_summary_rows(tables)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{stem}_over_{len(tables)}_checkpoints"
    title = (f"mean and standard deviation over {len(tables)} checkpoints (the spread of training, e.g. seeds; "
             "std with n - 1)")
    markdown = [f"# {args.data}: {title}\n"] + [f"- {table['checkpoint']}" for table in tables]
    print(f"\n{title}:")
    for condition in dict.fromkeys(row[0] for row in rows):
        chosen = [row[1:] for row in rows if row[0] == condition]
        print(f"\n[{condition}]")
        print(rps.format_table(columns[1:], chosen))
        markdown += [f"\n## {condition}\n", rps.format_markdown_table(columns[1:], chosen)]
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        csv.writer(f).writerows([columns] + [[rps._cell(v) for v in row] for row in rows])
    (out_dir / f"{name}.md").write_text("\n".join(markdown) + "\n")
    print(f"wrote in {out_dir}: {name}.csv, {name}.md")
