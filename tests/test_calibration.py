"""Calibrated probabilities: the temperature fitted at the end of training (smoothly: one mistake moves it a
little), the binary ECE over P(fake), the reliability diagram,
and the threshold chosen for TARGET_FPR on validation reals.

The temperature is checked against a direct minimisation of the NLL, the ECE against a hand computation,
and a short training run against what its best checkpoint's validation logits give when recomputed
here: the stored temperature, the ECE before and after, and the threshold's false-positive rate.
"""

import csv
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

import rine_plus_ssca as rps
from conftest import small_config, write_demo_tree

TARGET_FPR = 0.1
# Validation holds a generator training never sees, so that not every validation image is called right
# and the fitted temperature is an inner optimum, not a bound.
LAYOUT = {"train": {"nearest": 12, "bilinear": 12}, "val": {"nearest": 10, "transposed_conv": 10},
          "test": {"bilinear": 4, "transposed_conv": 4}}


def smoothed_targets(labels):
    """Platt's targets written out: (N+ + 1) / (N+ + 2) for fakes, 1 / (N- + 2) for reals."""
    labels = np.asarray(labels)
    n_fake, n_real = (labels == 1).sum(), (labels == 0).sum()
    return np.where(labels == 1, (n_fake + 1) / (n_fake + 2), 1 / (n_real + 2))


def nll(logits, labels, temperature):
    """Mean binary cross-entropy of sigmoid(logit / T) against Platt's targets t, written out
    (log(1 + e^x) - t x with x = z / T)."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    return float(np.mean(np.logaddexp(0.0, x) - smoothed_targets(labels) * x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# --------------------------------------------------------------------------- 1. fit_temperature

@pytest.mark.parametrize("seed", range(4))
def test_fitted_temperature_is_the_direct_minimum_of_the_nll(seed):
    # Overlapping classes (not separable), logits at several scales: too sharp, too flat, about right.
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 400)
    logits = (rng.normal(0, 1, 400) + (2 * labels - 1) * 1.2) * [0.3, 1.0, 4.0, 12.0][seed]
    temperature, at_bound = rps.fit_temperature(logits, labels)
    assert not at_bound
    # A dense grid over log T, then scipy's bounded minimiser started from the grid's best point.
    grid = np.exp(np.linspace(math.log(0.05), math.log(20), 20001))
    best = grid[np.argmin([nll(logits, labels, t) for t in grid])]
    assert temperature == pytest.approx(best, rel=1e-3)
    direct = minimize_scalar(lambda log_t: nll(logits, labels, math.exp(log_t)), method="bounded",
                             bounds=(math.log(best) - 0.01, math.log(best) + 0.01), options={"xatol": 1e-12})
    assert temperature == pytest.approx(math.exp(direct.x), rel=1e-6)
    for nearby in (temperature * 0.999, temperature * 1.001):
        assert nll(logits, labels, temperature) < nll(logits, labels, nearby)


def test_a_separated_validation_set_gets_a_finite_temperature_and_bounds_still_stop_the_fit():
    # Every logit on the right side of 0: against hard targets the NLL would fall all the way to T -> 0; the
    # smoothed targets (0.8 and 0.2 for 3 images a class) give an inner optimum, the direct minimum.
    labels = np.array([0, 0, 0, 1, 1, 1])
    logits = np.array([-3.0, -0.2, -1.0, 0.1, 2.0, 5.0])
    assert smoothed_targets(labels).tolist() == [0.2] * 3 + [0.8] * 3
    temperature, at_bound = rps.fit_temperature(logits, labels)
    assert not at_bound
    direct = minimize_scalar(lambda log_t: nll(logits, labels, math.exp(log_t)), method="bounded",
                             bounds=(math.log(0.05), math.log(20)), options={"xatol": 1e-10})
    assert temperature == pytest.approx(math.exp(direct.x), rel=1e-5)
    low, high = rps.TEMPERATURE_BOUNDS
    # Logits that say nothing (or the opposite of the truth): flattening always helps, the upper bound.
    assert rps.fit_temperature(np.array([1.0, -1.0, 1.0, -1.0]), np.array([1, 1, 0, 0])) == (high, True)
    assert rps.fit_temperature(-logits, labels) == (high, True)
    # No information at all: any temperature gives the same P(fake); 1 is kept.
    assert rps.fit_temperature(np.zeros(4), np.array([0, 1, 0, 1])) == (1.0, False)
    assert "lower bound 0.05" in rps.temperature_bound_reason(low)
    assert "upper bound 20" in rps.temperature_bound_reason(high)


def confident_logits(n=4000, seed=0):
    """n validation logits all on the right side of 0, |z| uniform in [4, 15], half reals, half fakes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    return np.where(labels == 1, 1.0, -1.0) * rng.uniform(4, 15, n), labels


SMOOTHNESS = 0.01  # the most T may move, relatively, when one mistake joins 4,000 confident logits


def test_one_mistake_among_thousands_moves_the_temperature_a_little():
    """A fake at logit -0.3 joins 4,000 confident logits, then a second one: against hard 0/1 targets T went
    from the bound 0.05 (the checkpoint then kept 1) to 0.48 with the first mistake; now it moves less than 1%."""
    logits, labels = confident_logits()
    temperatures = []
    for mistakes in range(3):
        these_logits, these_labels = np.append(logits, [-0.3] * mistakes), np.append(labels, [1] * mistakes)
        record = rps.calibration_record(these_labels, these_logits)  # what the best checkpoint stores
        assert record["temperature"] == rps.fit_temperature(these_logits, these_labels)[0] and not record["at_bound"]
        assert record["separated"] is (mistakes == 0)
        temperatures.append(record["temperature"])
    print("T with 0, 1, 2 mistakes:", temperatures)
    assert 0.5 < temperatures[0] < 2  # no sharpening without end on a set with no mistake
    for before, after in zip(temperatures, temperatures[1:]):
        assert abs(after / before - 1) < SMOOTHNESS, temperatures
    assert temperatures[0] < temperatures[1] < temperatures[2]  # each mistake flattens P(fake), a little


# --------------------------------------------------------------------------- 2. ECE

def test_ece_matches_a_hand_computation():
    labels = [0, 0, 1, 1, 1, 0, 1, 0]
    probs = [0.02, 0.05, 0.5, 0.52, 0.9, 0.92, 0.95, 1.0]
    # 15 bins of width 1/15: [0, 0.067) holds 0.02, 0.05 (no fakes, mean 0.035); [0.467, 0.533) holds
    # 0.5, 0.52 (2 fakes of 2, mean 0.51); [0.867, 0.933) holds 0.9, 0.92 (1 of 2, mean 0.91);
    # [0.933, 1] holds 0.95, 1.0 (1 of 2, mean 0.975).
    by_hand = (2 * abs(0 - 0.035) + 2 * abs(1 - 0.51) + 2 * abs(0.5 - 0.91) + 2 * abs(0.5 - 0.975)) / 8
    assert rps.expected_calibration_error(labels, probs) == pytest.approx(by_hand, abs=1e-12)
    counts, mean_p, fraction_fake = rps.reliability_bins(labels, probs)
    assert counts.tolist() == [2] + [0] * 6 + [2] + [0] * 5 + [2, 2]
    assert mean_p[7] == pytest.approx(0.51) and fraction_fake[13] == 0.5 and np.isnan(mean_p[1])
    # P(fake) itself is binned, not max(P, 1 - P): 0.1 and 0.9 are different bins.
    assert rps.expected_calibration_error([1, 0], [0.1, 0.9]) == pytest.approx(0.9)
    # One class only: the distance of the mean P(fake) from 1 (fakes) or 0 (reals); no images: NaN.
    assert rps.expected_calibration_error([1, 1, 1], [0.2, 0.6, 0.97]) == pytest.approx(1 - (0.2 + 0.6 + 0.97) / 3)
    assert rps.expected_calibration_error([0, 0], [0.3, 0.5]) == pytest.approx(0.4)
    assert math.isnan(rps.expected_calibration_error([], []))


def test_the_bin_ece_column_sits_between_auc_and_skipped_and_eval_says_what_it_is():
    assert rps.METRIC_COLUMNS.index("bin_ece") == rps.METRIC_COLUMNS.index("auc") + 1
    assert rps.METRIC_COLUMNS.index("skipped") == rps.METRIC_COLUMNS.index("bin_ece") + 1
    metrics = rps.binary_metrics([0, 1, 1], [0.1, 0.8, 1.0])
    assert metrics["bin_ece"] == pytest.approx((0.1 + 0.2 + 0) / 3)
    model = SimpleNamespace(temperature=1.0, calibration=None, config={"TEST_CROP": "grid"})
    lines = rps.calibration_lines(model, np.array([0, 1]), np.array([0.2, 0.9]), np.array([0.2, 0.9]))
    assert lines[0].startswith("bin_ece: the binary ECE over P(fake) (15 equal bins of P(fake)), not the top-label ECE")
    assert lines[1] == "binary ECE over P(fake) of all 2 images pooled: 0.1500; top-label ECE, to compare with papers: 0.1500"


def test_the_top_label_ece_bins_the_confidence_and_differs_from_the_binary_one():
    # P(fake) 0.1 (a real, right) and 0.9 (a fake, right): confidence 0.9 twice, both right: top-label ECE 0.1.
    assert rps.top_label_calibration_error([0, 1], [0.1, 0.9]) == pytest.approx(0.1)
    # P(fake) 0.2 for a fake and 0.8 for a real: both wrong at confidence 0.8, top-label ECE 0.8; the binary ECE
    # sees P(fake) 0.2 with no real and 0.8 with no fake in two bins, 0.8 as well.
    assert rps.top_label_calibration_error([1, 0], [0.2, 0.8]) == pytest.approx(0.8)
    # Where they differ: at P(fake) 0.7, 9 fakes of 10 (too unsure); at P(fake) 0.3, 5 fakes of 10 (too quick to
    # call reals). Binary: |0.9 - 0.7| and |0.5 - 0.3|, 0.2. Top-label: both at confidence 0.7, called right
    # 9 + 5 of 20 = 0.7 times: the two errors cancel, 0.
    labels, probs = [1] * 9 + [0] + [1] * 5 + [0] * 5, [0.7] * 10 + [0.3] * 10
    assert rps.expected_calibration_error(labels, probs) == pytest.approx(0.2)
    assert rps.top_label_calibration_error(labels, probs) == pytest.approx(0.0, abs=1e-12)


def test_probabilities_from_logits_do_not_saturate_when_sharpened():
    logits = torch.tensor([30.0, -30.0, 0.5])
    probs = rps.probabilities_from_logits(logits, 0.5)  # logit / T = +-60: float32 would say exactly 1 and 0
    assert probs.dtype == torch.float64 and 0 < probs[1] < 1e-25
    np.testing.assert_allclose(probs.numpy(), sigmoid(logits.numpy() / 0.5), rtol=1e-12)
    crops = np.array([[0.0, 2.0], [-1.0, 3.0]])  # ten-crop logits: the sigmoid of the mean of the crops' logits
    np.testing.assert_allclose(rps.probabilities_from_logits(crops, 2.0), sigmoid(crops.mean(axis=1) / 2.0))


def test_ten_crops_average_logits_as_rine_does():
    # One confident "real" crop against nine mildly "fake" ones: RINE's sigmoid(mean logit) = sigmoid(-0.1) says
    # real; the mean of the crops' P(fake) would say 0.658, fake.
    crops = torch.tensor([[-10.0] + [1.0] * 9])
    p = float(rps.probabilities_from_logits(crops)[0])
    assert p == pytest.approx(0.4750208, abs=1e-6)
    assert rps.binary_metrics([0], [p])["acc"] == 1.0  # called real at 0.5


def test_ten_crop_verdicts_ap_and_auc_do_not_depend_on_the_temperature():
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    crops = rng.normal(labels[:, None] - 0.5, 1.0, (40, 10))
    crops[::3, 0] = rng.choice([-12.0, 12.0], size=len(crops[::3]))  # one outlying crop in every third image
    at_one = rps.binary_metrics(labels, rps.probabilities_from_logits(crops))
    assert 0.5 < at_one["auc"] < 1
    for temperature in (0.2, 0.7, 3.0, 10.0):
        metrics = rps.binary_metrics(labels, rps.probabilities_from_logits(crops, temperature))
        assert [metrics[k] for k in ("acc", "ap", "auc")] == [at_one[k] for k in ("acc", "ap", "auc")], temperature


def test_a_stored_threshold_meeting_ten_crop_scores_is_said_in_one_line():
    calibration = rps.calibration_record([0, 0, 0, 1, 1, 1], [-2.0, -1.0, 0.5, 1.5, 2.0, -0.2], target_fpr=0.4)
    model = SimpleNamespace(temperature=calibration["temperature"], calibration=calibration, config={"TEST_CROP": "grid"})
    labels, probs = np.array([0, 1]), np.array([0.2, 0.9])
    centre = rps.calibration_lines(model, labels, probs, probs)
    ten_crops = rps.calibration_lines(model, labels, probs, probs, tencrop=True)
    assert any(line.startswith("stored threshold") for line in centre)
    assert ten_crops[:-1] == centre and len(ten_crops) == len(centre) + 1
    assert "centre crops" in ten_crops[-1] and "--tencrop" in ten_crops[-1]


def test_rine_scoring_uses_a_float32_sigmoid_and_calls_fake_above_the_threshold():
    logits = torch.tensor([17.0, 0.0, -3.0])
    rine = rps.probabilities_from_logits(logits, float32=True)
    assert rine.dtype == torch.float64  # returned as float64, computed in float32 as RINE does
    assert rine[0] == 1.0 and rine[1] == 0.5 and rine[2] == torch.sigmoid(torch.tensor(-3.0)).item()
    assert rps.probabilities_from_logits(logits)[0] < 1.0  # float64 keeps it below 1
    assert rps.called_fake([0.5, 0.6], 0.5).tolist() == [True, True]
    assert rps.called_fake([0.5, 0.6], 0.5, strict=True).tolist() == [False, True]  # RINE: P(fake) > 0.5
    assert rps.binary_metrics([0, 1], [0.5, 0.6], 0.5, strict=True)["acc"] == 1.0
    assert rps.rates_at([0, 1], [0.5, 0.5], 0.5, strict=True) == (0.0, 0.0)


# --------------------------------------------------------------------------- 3. a short training run

@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_backbone):
    """Two epochs with TARGET_FPR set; the validation logits of the best checkpoint recomputed here."""
    root = tmp_path_factory.mktemp("calibration_run")
    write_demo_tree(root / "data", LAYOUT, seed=4)
    cfg = small_config(tiny_backbone, DATA_DIR=str(root / "data"), CHECKPOINT_DIR=str(root / "checkpoints"),
                       EPOCHS=2, TARGET_FPR=TARGET_FPR)
    best = Path(rps.train(cfg))
    # The validation images as training scored them: the same loader (order and batches) on the loaded model.
    raw_model = rps.load_detector(best, device="cpu", calibrated=False)
    _, val_items = rps.prepare_splits(cfg)
    loader = rps.make_loader(val_items, cfg, train=False, device=torch.device("cpu"))
    _, labels, raw_probs, logits, _, _ = rps.score_loader(raw_model, loader, torch.device("cpu"), None)
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    return dict(root=root, cfg=cfg, best=best, checkpoint=checkpoint, calibration=checkpoint["calibration"],
                labels=labels.astype(int), logits=logits, raw_probs=raw_probs,
                test_images=sorted(str(p) for p in (root / "data/test").rglob("*.png")))


def test_best_checkpoint_stores_the_temperature_fitted_on_its_validation_logits(run):
    calibration, labels, logits = run["calibration"], run["labels"], run["logits"]
    assert set(calibration) == {"temperature", "n_images", "at_bound", "separated", "val_ece_raw", "val_ece_calibrated",
                                "target_fpr", "fpr_threshold", "fpr_threshold_raw", "val_fpr", "val_fake_recall"}
    assert calibration["n_images"] == len(labels) == 40
    temperature, at_bound = rps.fit_temperature(logits, labels)
    assert calibration["temperature"] == pytest.approx(temperature, rel=1e-6)
    assert calibration["at_bound"] is at_bound is False and calibration["temperature"] != 1.0
    assert calibration["separated"] is False
    # The ECE before and after, recomputed from the logits; calibrating did not make it worse.
    raw_ece = rps.expected_calibration_error(labels, sigmoid(logits))
    calibrated_ece = rps.expected_calibration_error(labels, sigmoid(logits / temperature))
    assert calibration["val_ece_raw"] == pytest.approx(raw_ece, abs=1e-6)
    assert calibration["val_ece_calibrated"] == pytest.approx(calibrated_ece, abs=1e-6)
    assert calibration["val_ece_calibrated"] <= calibration["val_ece_raw"]
    # The validation metrics (history, checkpoint metrics) are those of the raw P(fake), ECE included.
    assert run["checkpoint"]["metrics"]["bin_ece"] == pytest.approx(raw_ece, abs=1e-6)
    # The last checkpoint holds no calibration of its own; its resume state keeps the best one's.
    last = torch.load(run["best"].with_name(rps.LAST_NAME), map_location="cpu", weights_only=True)
    assert "calibration" not in last and last["resume"]["best_calibration"] == calibration


def test_the_stored_threshold_keeps_the_false_positive_rate_on_validation_reals(run):
    calibration, labels, logits = run["calibration"], run["labels"], run["logits"]
    assert calibration["target_fpr"] == TARGET_FPR
    reals, fakes = labels == 0, labels == 1
    calibrated = rps.probabilities_from_logits(logits, calibration["temperature"])
    for probs, threshold in ((calibrated, calibration["fpr_threshold"]), (run["raw_probs"], calibration["fpr_threshold_raw"])):
        called_fake = probs >= threshold
        assert called_fake[reals].mean() <= TARGET_FPR
        # The lowest such threshold: the real just below it would push the rate above TARGET_FPR.
        below = probs[reals][probs[reals] < threshold]
        assert (probs[reals] >= below.max()).mean() > TARGET_FPR
    assert calibration["val_fpr"] == pytest.approx((calibrated[reals] >= calibration["fpr_threshold"]).mean())
    assert calibration["val_fake_recall"] == pytest.approx((calibrated[fakes] >= calibration["fpr_threshold"]).mean())


def test_training_prints_the_calibration(run, capsys):
    rps.print_calibration(run["calibration"])
    out = capsys.readouterr().out
    t, n = run["calibration"]["temperature"], run["calibration"]["n_images"]
    assert f"calibration: temperature {t:.3g} fitted on {n} validation images; validation binary ECE over P(fake) " in out
    assert f"calibration: threshold {run['calibration']['fpr_threshold']:.4g} " in out and "(TARGET_FPR 0.1)" in out


def test_a_separated_validation_set_gets_its_temperature_and_training_says_so(capsys):
    """Every validation image right at 0.5: the smoothed targets still fit a temperature (no longer a fixed 1)."""
    calibration = rps.calibration_record([0, 0, 1, 1], [-2.0, -1.0, 1.0, 3.0])
    assert calibration["separated"] and not calibration["at_bound"]
    assert calibration["temperature"] == rps.fit_temperature([-2.0, -1.0, 1.0, 3.0], [0, 0, 1, 1])[0] != 1.0
    assert calibration["fpr_threshold"] is None and calibration["target_fpr"] is None
    rps.print_calibration(calibration)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"calibration: temperature {calibration['temperature']:.3g} fitted on 4 "
                                                   "validation images, all on the right side of P(fake) 0.5")


def test_a_temperature_at_its_bound_is_explained_in_training(capsys):
    # Not separated (one image on the wrong side), but the logits are so small that the best T is about
    # 0.0046 (9 sigmoid(-x) = sigmoid(x) at x = 0.01 / T, so x = log 9): below the bound 0.05.
    labels, logits = [1] * 9 + [0], [0.01] * 9 + [0.01]
    calibration = rps.calibration_record(labels, logits)
    assert not calibration["separated"]
    assert calibration["temperature"] == rps.TEMPERATURE_BOUNDS[0] and calibration["at_bound"]
    rps.print_calibration(calibration)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("warning: calibration: the temperature stopped at its lower bound 0.05")


def test_the_demo_checkpoint_stores_the_calibration_of_its_validation_images(demo):
    """The demo itself: what the checkpoint stores matches its validation images scored again here. (Its 120
    validation images are all called right, so the smoothed targets flatten P(fake) a little, and the binary
    ECE on those same images rises: ECE on a separated set rewards P(fake) of exactly 0 and 1.)"""
    cwd, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    best = cwd / "checkpoints/demo" / rps.BEST_NAME
    calibration = torch.load(best, map_location="cpu", weights_only=True)["calibration"]
    model = rps.load_detector(best, device="cpu", calibrated=False)
    batch_size = rps.read_checkpoint(best)["run_config"]["BATCH_SIZE"]  # the validation batches of training
    cfg = SimpleNamespace(**dict(model.config, NUM_WORKERS=0, BATCH_SIZE=batch_size))
    items = rps.collect_test_items(cwd / "data/demo/val")
    loader = rps.make_loader(items, cfg, train=False, device=torch.device("cpu"))
    _, labels, _, logits, _, _ = rps.score_loader(model, loader, torch.device("cpu"), None)
    expected = rps.calibration_record(labels, logits)
    assert calibration["n_images"] == len(labels) == len(items)
    assert calibration["separated"] == expected["separated"]
    assert calibration["temperature"] == pytest.approx(expected["temperature"], rel=1e-6)
    assert calibration["val_ece_raw"] == pytest.approx(expected["val_ece_raw"], abs=1e-6)
    assert "calibration: " in result.stdout


# --------------------------------------------------------------------------- 4. predict

def raw_logits(model, paths):
    """The model's logits for these images, from its forward on the test crop (no predict involved)."""
    transform = rps.build_transform(SimpleNamespace(**model.config), train=False)
    pixels = rps.normalise_uint8(torch.stack([transform(rps.open_image(p)) for p in paths]))
    with torch.no_grad():
        logits, _ = model(pixels)
    return logits.double().numpy()


def predict_command(run, capsys, *extra, out=None):
    """`predict` in this process: (stdout, {path: (P(fake) in the CSV, verdict)})."""
    out = out or run["root"] / "predict.csv"
    code = rps.main(["predict", *run["test_images"], "--ckpt", str(run["best"]), "--num-workers", "0", "--device", "cpu",
                     "--out", str(out), *map(str, extra)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    return stdout, {row["path"]: (float(row["p_fake"]), row["verdict"]) for row in csv.DictReader(open(out))}


def test_predict_gives_the_calibrated_p_and_uncalibrated_the_raw_one(run, capsys):
    model = rps.load_detector(run["best"], device="cpu")
    paths, t = run["test_images"], run["calibration"]["temperature"]
    assert model.temperature == t and model.calibration == run["calibration"]
    logits = raw_logits(model, paths)
    np.testing.assert_allclose(rps.predict(model, paths), sigmoid(logits / t), rtol=1e-5, atol=1e-7)
    raw = rps.load_detector(run["best"], device="cpu", calibrated=False)
    assert raw.temperature == 1.0
    np.testing.assert_allclose(rps.predict(raw, paths), sigmoid(logits), rtol=1e-5, atol=1e-7)
    assert np.abs(sigmoid(logits / t) - sigmoid(logits)).max() > 1e-3  # the two differ: the check means something

    stdout, rows = predict_command(run, capsys)
    np.testing.assert_allclose([rows[p][0] for p in paths], sigmoid(logits / t), atol=1e-6)
    assert "P(fake) is calibrated, sigmoid(logit / T) with the temperature T = " in stdout
    stdout, rows = predict_command(run, capsys, "--uncalibrated")
    np.testing.assert_allclose([rows[p][0] for p in paths], sigmoid(logits), atol=1e-6)
    assert "P(fake) is raw, sigmoid(logit), not calibrated" in stdout


def test_predict_uses_the_stored_threshold_unless_given_one(run, capsys):
    calibration = run["calibration"]
    for extra, threshold, key in (([], calibration["fpr_threshold"], "fpr_threshold"),
                                  (["--uncalibrated"], calibration["fpr_threshold_raw"], "fpr_threshold_raw")):
        stdout, rows = predict_command(run, capsys, *extra)
        assert all(verdict == ("fake" if p >= threshold else "real") for p, verdict in rows.values()), (key, rows)
        n_fake = sum(verdict == "fake" for _, verdict in rows.values())
        assert f"({n_fake} fake, {len(rows) - n_fake} real at threshold {threshold:.4g})" in stdout
        assert (f"threshold {threshold:.4g}: at most 10% of validation reals called fake (TARGET_FPR 0.1), chosen in "
                "training; --threshold overrides it") in stdout
    # An explicit --threshold wins, and nothing is said about the stored one.
    probs = np.array([p for p, _ in rows.values()])
    given = float(np.median(probs))
    stdout, rows = predict_command(run, capsys, "--threshold", given)
    assert [verdict for _, verdict in rows.values()] == ["fake" if p >= given else "real" for p, _ in rows.values()]
    assert f"real at threshold {given})" in stdout and "TARGET_FPR" not in stdout
    # In Python the same choice: decision_threshold.
    model = rps.load_detector(run["best"], device="cpu")
    assert rps.decision_threshold(model)[0] == calibration["fpr_threshold"]
    assert rps.decision_threshold(model, 0.3) == (0.3, None)
    model.temperature = 2.5  # a temperature set by hand matches neither stored threshold
    assert rps.decision_threshold(model) == (model.config["THRESHOLD"], None)


# --------------------------------------------------------------------------- 5. eval

def test_eval_reports_ece_per_generator_the_stored_threshold_and_draws_the_reliability_diagram(run, capsys):
    out = run["root"] / "eval"
    args = ["eval", "--ckpt", str(run["best"]), "--data", str(run["root"] / "data/test"), "--num-workers", "0",
            "--device", "cpu", "--out", str(out)]
    assert rps.main(args) == 0
    stdout = capsys.readouterr().out
    model = rps.load_detector(run["best"], device="cpu")
    paths = run["test_images"]
    probs = dict(zip(paths, rps.predict(model, paths)))
    rows = {row["generator"]: row for row in csv.DictReader(open(out / "eval_test.csv"))}
    for generator in ("bilinear", "transposed_conv"):
        chosen = [p for p in paths if f"/{generator}/" in p]
        labels = [int("/1_fake/" in p) for p in chosen]
        expected = rps.expected_calibration_error(labels, [probs[p] for p in chosen])
        assert abs(float(rows[generator]["bin_ece"]) - expected) <= 5e-5 + 1e-6, generator
    assert stdout.count("P(fake) is calibrated, sigmoid(logit / T) with the temperature T = ") == 1
    png = out / "eval_test_reliability.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eval_test_reliability.png" in [line for line in stdout.splitlines() if line.startswith("wrote in")][0]
    # The stored threshold on these test images: its false-positive rate and fake recall, as computed here.
    labels = np.array([int("/1_fake/" in p) for p in paths])
    scores = np.array([probs[p] for p in paths])
    threshold = run["calibration"]["fpr_threshold"]
    match = re.search(r"stored threshold (\S+) \(TARGET_FPR 0\.1, chosen on validation reals\): on these images it "
                      r"calls (\d\.\d{4}) of the reals fake \(false-positive rate\) and finds (\d\.\d{4}) of the fakes", stdout)
    assert match, stdout[-3000:]
    assert float(match.group(1)) == pytest.approx(threshold, rel=5e-4)
    assert float(match.group(2)) == pytest.approx((scores[labels == 0] >= threshold).mean(), abs=5e-5)
    assert float(match.group(3)) == pytest.approx((scores[labels == 1] >= threshold).mean(), abs=5e-5)
    # The pooled ECE, of the calibrated and of the raw P(fake).
    raw_scores = rps.predict(rps.load_detector(run["best"], device="cpu", calibrated=False), paths)
    match = re.search(r"binary ECE over P\(fake\) of all (\d+) images pooled: (\d\.\d{4}) \(raw P\(fake\), sigmoid\(logit\): (\d\.\d{4})\)", stdout)
    assert match and int(match.group(1)) == len(paths)
    assert float(match.group(2)) == pytest.approx(rps.expected_calibration_error(labels, scores), abs=5e-5)
    assert float(match.group(3)) == pytest.approx(rps.expected_calibration_error(labels, raw_scores), abs=5e-5)
    # The tables keep the papers' threshold (0.5), not the stored one.
    assert "data/test [clean], threshold 0.5:" in stdout.replace(str(run["root"]) + "/", "")


def test_eval_uncalibrated_reports_the_raw_p(run, capsys):
    out = run["root"] / "eval_raw"
    assert rps.main(["eval", "--ckpt", str(run["best"]), "--data", str(run["root"] / "data/test"), "--num-workers", "0",
                     "--device", "cpu", "--out", str(out), "--uncalibrated"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("P(fake) is raw, sigmoid(logit), not calibrated") == 1
    paths = run["test_images"]
    raw = dict(zip(paths, rps.predict(rps.load_detector(run["best"], device="cpu", calibrated=False), paths)))
    rows = {row["generator"]: row for row in csv.DictReader(open(out / "eval_test_uncalibrated.csv"))}  # named so
    chosen = [p for p in paths if "/transposed_conv/" in p]
    expected = rps.expected_calibration_error([int("/1_fake/" in p) for p in chosen], [raw[p] for p in chosen])
    assert abs(float(rows["transposed_conv"]["bin_ece"]) - expected) <= 5e-5 + 1e-6
    threshold = run["calibration"]["fpr_threshold_raw"]  # the stored threshold's twin on the raw scale
    assert f"stored threshold {threshold:.4g} (TARGET_FPR 0.1" in stdout
    assert (out / "eval_test_uncalibrated_reliability.png").is_file()


# --------------------------------------------------------------------------- 6. checkpoints with and without

def test_a_checkpoint_without_calibration_loads_with_temperature_one(run, tmp_path, capsys):
    old = dict(run["checkpoint"])
    del old["calibration"]
    path = tmp_path / "old.pth"
    rps.atomic_torch_save(old, path)
    model = rps.load_detector(path, device="cpu")
    assert model.temperature == 1.0 and model.calibration is None
    paths = run["test_images"][:3]
    np.testing.assert_allclose(rps.predict(model, paths), sigmoid(raw_logits(model, paths)), rtol=1e-5, atol=1e-7)
    assert rps.decision_threshold(model) == (model.config["THRESHOLD"], None)
    code = rps.main(["predict", *paths, "--ckpt", str(path), "--num-workers", "0", "--device", "cpu"])
    stdout = capsys.readouterr().out
    assert code == 0 and stdout.count("uncalibrated") == 1 and "TARGET_FPR" not in stdout
    assert "P(fake) is uncalibrated, sigmoid(logit): the checkpoint stores no temperature" in stdout


def test_export_carries_the_calibration(run, tmp_path, capsys):
    out = tmp_path / "detector.safetensors"
    assert rps.main(["export", "--ckpt", str(run["best"]), "--out", str(out)]) == 0
    capsys.readouterr()
    model = rps.load_detector(out, device="cpu")
    assert model.calibration == run["calibration"] and model.temperature == run["calibration"]["temperature"]
    paths = run["test_images"][:3]
    np.testing.assert_array_equal(rps.predict(model, paths), rps.predict(rps.load_detector(run["best"], device="cpu"), paths))


def test_the_temperature_is_no_parameter_or_buffer(make_cfg):
    for spectral in (True, False):
        model = rps.RINEPlusSSCA(make_cfg(USE_SPECTRAL=spectral))
        assert model.temperature == 1.0 and model.calibration is None
        assert not [k for k in model.state_dict() if "temperature" in k or "calibration" in k]


@pytest.mark.parametrize("value", ["1", "-0.1", "1.5"])
def test_target_fpr_outside_0_1_is_one_line_error(value, capsys):
    assert rps.main(["--target-fpr", value, "--data-dir", "nowhere"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: TARGET_FPR={float(value)} must be at least 0 and below 1")


@pytest.mark.slow
def test_a_calibration_share_fits_the_temperature_and_threshold_apart_from_choosing_the_epoch(tmp_path, tiny_backbone):
    write_demo_tree(tmp_path / "data", {"train": {"nearest": 12, "bilinear": 12}, "val": {"nearest": 8, "bilinear": 8}},
                    seed=9)
    cfg = small_config(tiny_backbone, DATA_DIR=str(tmp_path / "data"), CHECKPOINT_DIR=str(tmp_path / "ckpt"), EPOCHS=2,
                       CALIBRATION_FRACTION=0.5, TARGET_FPR=0.2)
    rps.train(cfg)
    best = rps.read_checkpoint(tmp_path / "ckpt" / rps.BEST_NAME)
    _, val_items = rps.prepare_splits(cfg)
    kept_apart = rps.calibration_items(val_items, cfg)
    selection = [item for item in val_items if item not in kept_apart]
    assert len(kept_apart) == 16 and {label for _, label, _ in kept_apart} == {0, 1}
    # The epoch's metrics count the selection images only; the calibration counts the others only.
    assert (best["metrics"]["n_real"], best["metrics"]["n_fake"]) == (8, 8)
    assert best["calibration"]["n_images"] == 16
    model = rps.load_detector(tmp_path / "ckpt" / rps.BEST_NAME, device="cpu", calibrated=False)
    _, kept, labels, probs, logits = rps.evaluate_items(model, kept_apart, batch_size=8, num_workers=0)
    temperature, _ = rps.fit_temperature(logits, labels)
    assert best["calibration"]["temperature"] == pytest.approx(temperature, rel=1e-6)
    reals = rps.probabilities_from_logits(logits[labels == 0], temperature)
    assert best["calibration"]["fpr_threshold"] == pytest.approx(rps.threshold_for_fpr(reals, 0.2), rel=1e-6)
    _, _, selection_labels, selection_probs, _ = rps.evaluate_items(model, selection, batch_size=8, num_workers=0)
    assert best["metrics"]["ap"] == pytest.approx(rps.binary_metrics(selection_labels, selection_probs)["ap"], abs=1e-6)
