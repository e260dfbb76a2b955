"""The statistics behind eval's intervals and compare: metrics, the stratified bootstrap, McNemar's test,
the paired comparison, and where the validation set comes from (never the test set)."""

import math

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.metrics import average_precision_score, roc_auc_score

import rine_plus_ssca as rps
from conftest import write_demo_tree
from rine_plus_ssca_tools import statistics


def test_average_precision_and_auc_equal_sklearns_with_ties():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(2, 80))
        labels = rng.integers(0, 2, n)
        if labels.min() == labels.max():
            continue
        scores = np.round(rng.random(n), int(rng.integers(1, 4)))  # coarse rounding makes many ties
        assert statistics.average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
        assert statistics.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        checked += 1
    assert checked > 250


def exact_stratified_accuracy_quantiles(n_real, right_real, n_fake, right_fake, confidence=0.95):
    """The stratified bootstrap of an accuracy is exact to write down: the reals called right are
    Binomial(n_real, right_real / n_real), the fakes Binomial(n_fake, ...), independent. Their sum's quantiles."""
    real = binom.pmf(np.arange(n_real + 1), n_real, right_real / n_real)
    fake = binom.pmf(np.arange(n_fake + 1), n_fake, right_fake / n_fake)
    cdf = np.cumsum(np.convolve(real, fake))
    tail = (1 - confidence) / 2
    return np.searchsorted(cdf, tail) / (n_real + n_fake), np.searchsorted(cdf, 1 - tail) / (n_real + n_fake)


def test_bootstrap_interval_of_an_accuracy_matches_the_exact_distribution():
    n_real, right_real, n_fake, right_fake = 60, 48, 40, 22  # acc 0.70
    labels = np.array([0] * n_real + [1] * n_fake)
    probs = np.array([0.2] * right_real + [0.8] * (n_real - right_real) + [0.9] * right_fake + [0.1] * (n_fake - right_fake))
    (name, intervals), _ = statistics.table_intervals([("gen", labels, probs)], 0.5, False, n_resamples=4000, seed=1)
    low, high = intervals["acc"]
    want_low, want_high = exact_stratified_accuracy_quantiles(n_real, right_real, n_fake, right_fake)
    assert name == "gen"
    assert abs(low - want_low) <= 0.011 and abs(high - want_high) <= 0.011, (low, high, want_low, want_high)
    assert high - low > 0.1  # a real width, not a degenerate interval


def test_every_resample_keeps_both_classes_and_their_counts():
    labels = np.array([1] + [0] * 99)  # one fake among 99 reals: a plain bootstrap would often lose it
    rng = np.random.default_rng(0)
    for _ in range(200):
        chosen = statistics.stratified_resample(labels, rng)
        assert len(chosen) == 100 and labels[chosen].sum() == 1
    probs = np.linspace(0, 1, 100)
    draws = statistics.bootstrap_draws(labels, [probs], [(0.5, False)], 300, np.random.default_rng(1))
    assert not np.isnan(draws).any()  # AP and AUC exist in every resample


def test_mean_row_interval_resamples_within_every_row():
    rng = np.random.default_rng(2)
    rows = []
    for name, shift in (("easy", 3.0), ("hard", 0.3)):
        labels = np.array([0] * 50 + [1] * 50)
        rows.append((name, labels, 1 / (1 + np.exp(-(rng.normal(size=100) + shift * (2 * labels - 1))))))
    rows.append(("fakes", np.ones(10, int), np.full(10, 0.9)))  # one class: no AP, and out of the mean
    result = dict(statistics.table_intervals(rows, 0.5, False, n_resamples=500, seed=0))
    assert list(result) == ["easy", "hard", "fakes", "mean (2 generators)"]
    assert math.isnan(result["fakes"]["ap"][0]) and result["fakes"]["acc"] == (1.0, 1.0)
    for metric in statistics.METRICS:
        easy, hard, mean = result["easy"][metric], result["hard"][metric], result["mean (2 generators)"][metric]
        # averaging two independent rows: the mean's interval sits between theirs and is narrower than the wider
        assert min(easy[0], hard[0]) <= mean[0] <= mean[1] <= max(easy[1], hard[1])
        assert mean[1] - mean[0] < max(easy[1] - easy[0], hard[1] - hard[0])
    assert result["hard"]["ap"][1] < result["easy"]["ap"][0]  # the two rows are told apart


@pytest.mark.parametrize("only_a, only_b, both_right, both_wrong", [(9, 2, 30, 5), (0, 0, 10, 1), (5, 5, 0, 0), (0, 7, 3, 3), (13, 1, 0, 4)])
def test_mcnemar_equals_the_binomial_test_computed_directly(only_a, only_b, both_right, both_wrong):
    correct_a = [True] * only_a + [False] * only_b + [True] * both_right + [False] * both_wrong
    correct_b = [False] * only_a + [True] * only_b + [True] * both_right + [False] * both_wrong
    n = only_a + only_b
    # two-sided exact binomial test of min(only_a, only_b) successes in n at 1/2, summed by hand
    direct = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n)
    assert statistics.mcnemar_exact(correct_a, correct_b) == (only_a, only_b, pytest.approx(direct, rel=1e-12))


def synthetic_rows(rng, n=80, rows=("gan", "diffusion")):
    return [(name, np.array([0] * (n // 2) + [1] * (n // 2))) for name in rows]


def noisy_scores(rng, labels, separation):
    return 1 / (1 + np.exp(-(rng.normal(size=len(labels)) + separation * (2 * labels - 1))))


def test_comparing_a_group_with_itself_gives_zero_and_a_better_model_a_positive_interval():
    rng = np.random.default_rng(3)
    rows = synthetic_rows(rng)
    group = [[noisy_scores(rng, labels, 1.0) for _, labels in rows] for _ in range(3)]
    same = statistics.compare_groups(rows, group, group, [(0.5, False)] * 3, [(0.5, False)] * 3, n_resamples=300)
    for result in same:
        for metric in statistics.METRICS:
            assert result[metric]["difference"] == 0
        assert result["acc"]["interval"][0] <= 0 <= result["acc"]["interval"][1]
    better = [[noisy_scores(rng, labels, 3.0) for _, labels in rows] for _ in range(3)]
    results = statistics.compare_groups(rows, better, group, [(0.5, False)] * 3, [(0.5, False)] * 3, n_resamples=300)
    assert [r["row"] for r in results] == ["gan", "diffusion", "mean (2 generators)"]
    for result in results:
        assert result["ap"]["interval"][0] > 0 and result["auc"]["interval"][0] > 0, result
        a = result["ap"]
        assert a["difference"] == pytest.approx(a["a_mean"] - a["b_mean"])
    assert results[0]["mcnemar_p"] < 0.01
    # per row, the group means are the means of each checkpoint's own metric
    labels = rows[0][1]
    want = np.mean([average_precision_score(labels, model[0]) for model in better])
    assert results[0]["ap"]["a_mean"] == pytest.approx(want, abs=1e-12)
    assert results[0]["ap"]["a_std"] == pytest.approx(np.std([average_precision_score(labels, m[0]) for m in better], ddof=1))


def test_the_group_interval_is_wider_than_one_pair_when_seeds_disagree():
    """Resampling the checkpoints too: seeds that disagree widen the interval of the difference."""
    rng = np.random.default_rng(4)
    rows = synthetic_rows(rng, n=200, rows=("gan",))
    labels = rows[0][1]
    spread = [[noisy_scores(rng, labels, s)] for s in (0.3, 1.0, 2.5)]  # three "seeds" of very different quality
    base = [[noisy_scores(rng, labels, 1.0)]]
    one = statistics.compare_groups(rows, spread[1:2], base, [(0.5, False)], [(0.5, False)], n_resamples=400)[0]
    group = statistics.compare_groups(rows, spread, base, [(0.5, False)] * 3, [(0.5, False)], n_resamples=400)[0]
    width = lambda r: r["auc"]["interval"][1] - r["auc"]["interval"][0]  # noqa: E731
    assert width(group) > 1.5 * width(one)


def test_held_out_validation_classes_never_reach_training(tmp_path, make_cfg):
    write_demo_tree(tmp_path, {"train": {"bilinear": 4, "nearest": 3, "transposed_conv": 2},
                               "test": {"bilinear": 2, "transposed_conv": 2}}, seed=0)
    cfg = make_cfg(DATA_DIR=str(tmp_path), VAL_CLASSES="nearest")
    train_items, val_items = rps.prepare_splits(cfg)
    assert {item[2] for item in train_items} == {"bilinear", "transposed_conv"}
    assert {item[2] for item in val_items} == {"nearest"} and len(val_items) == 6
    # with a validation folder that holds the class, validation comes from there, and training still lacks it
    write_demo_tree(tmp_path, {"val": {"nearest": 1, "bilinear": 1}}, seed=1)
    train_items, val_items = rps.prepare_splits(cfg)
    assert {item[2] for item in train_items} == {"bilinear", "transposed_conv"}
    assert all("/val/nearest/" in item[0] for item in val_items) and len(val_items) == 2
    with pytest.raises(rps.UserError, match="VAL_CLASSES='horse' names no folder"):
        rps.prepare_splits(make_cfg(DATA_DIR=str(tmp_path), VAL_CLASSES="horse"))


def test_no_default_path_validates_on_the_test_folder(tmp_path, make_cfg):
    """Selection, temperature and threshold come from validation images; a test/ folder beside train/ is never read."""
    write_demo_tree(tmp_path, {"train": {"bilinear": 5}, "test": {"bilinear": 3}}, seed=0)
    for overrides in ({}, {"VAL_FRACTION": 0.4}, {"VAL_CLASSES": "bilinear"}):
        try:
            train_items, val_items = rps.prepare_splits(make_cfg(DATA_DIR=str(tmp_path), **overrides))
        except rps.UserError:  # VAL_CLASSES of the only class leaves nothing to train on: refused, fine
            continue
        assert not any("/test/" in item[0] for item in train_items + val_items)
    write_demo_tree(tmp_path, {"val": {"bilinear": 2}}, seed=1)
    _, val_items = rps.prepare_splits(make_cfg(DATA_DIR=str(tmp_path)))
    assert val_items and all("/val/" in item[0] for item in val_items)


def test_data_seed_fixes_the_hold_out_and_the_views_apart_from_seed(tmp_path, make_cfg):
    write_demo_tree(tmp_path, {"train": {"bilinear": 10}}, seed=0)
    splits = {}
    for seed, data_seed in ((0, 0), (1, 0), (2, 0), (0, 1)):
        _, val = rps.prepare_splits(make_cfg(DATA_DIR=str(tmp_path), SEED=seed, DATA_SEED=data_seed, VAL_FRACTION=0.3))
        splits[(seed, data_seed)] = sorted(item[0] for item in val)
    assert splits[(0, 0)] == splits[(1, 0)] == splits[(2, 0)]  # the same validation images, whatever SEED
    assert splits[(0, 1)] != splits[(0, 0)]  # DATA_SEED draws them
    a = rps.SeededEpochSampler(20, seed=1, batch_size=4, drop_last=True, view_seed=7)
    b = rps.SeededEpochSampler(20, seed=2, batch_size=4, drop_last=True, view_seed=7)
    views_a, views_b = {i: v for i, v, _ in a}, {i: v for i, v, _ in b}
    assert views_a == views_b  # the same augmented view of each image
    assert [i for i, _, _ in a] != [i for i, _, _ in b]  # in another order
