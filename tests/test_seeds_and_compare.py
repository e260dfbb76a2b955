"""Several seeds of one configuration, eval over several checkpoints with per-image scores, and compare."""

import csv
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import rine_plus_ssca as rps
from rine_plus_ssca_tools import plots, seeds
from conftest import nonempty_lines, run_script, small_config, write_demo_tree

SEEDS = [0, 1, 2]


def cfg_data_seed():
    return rps.default_config().DATA_SEED


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory, tiny_backbone):
    """train_seeds over three seeds on a small tree, validating on a generator kept out of training (~20 s)."""
    root = tmp_path_factory.mktemp("seeds")
    write_demo_tree(root / "data", {"train": {"bilinear": 12, "nearest": 6},
                                    "test": {"bilinear": 4, "transposed_conv": 4}}, seed=3)
    cfg = small_config(tiny_backbone, DATA_DIR=str(root / "data"), CHECKPOINT_DIR=str(root / "runs"), EPOCHS=1,
                       VAL_CLASSES="nearest", CACHE_FEATURES=True, CACHE_VIEWS=1)
    with pytest.MonkeyPatch.context() as patch:
        printed = []
        patch.setattr("builtins.print", lambda *args, **kw: printed.append(" ".join(map(str, args))))
        paths = seeds.train_seeds(cfg, SEEDS)
    return dict(root=root, paths=paths, stdout="\n".join(printed))


@pytest.fixture(scope="module")
def evaluated_seeds(seeds_run):
    """`eval` of the three checkpoints together."""
    root = seeds_run["root"]
    result = run_script(["eval", "--ckpt", *seeds_run["paths"], "--data", "data/test", "--out", "out", "--device", "cpu",
                         "--num-workers", "0", "--bootstrap", "200"], cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return dict(root=root, out=root / "out", result=result)


@pytest.mark.slow
def test_seeds_train_distinct_checkpoints_sharing_validation_and_cache(seeds_run):
    root, paths = seeds_run["root"], seeds_run["paths"]
    assert [p.parent.name for p in paths] == [f"seed_{s}" for s in SEEDS] and all(p.is_file() for p in paths)
    states = [rps.read_checkpoint(p)["model"] for p in paths]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert any(not torch.equal(states[a][k], states[b][k]) for k in states[a]), (a, b)
    configs = [rps.checkpoint_config(rps.read_checkpoint(p)) for p in paths]
    assert [c["SEED"] for c in configs] == SEEDS and {c["DATA_SEED"] for c in configs} == {cfg_data_seed()}
    caches = sorted(p.name.split("-")[0] for p in (root / "runs" / "cache").iterdir())
    assert caches == ["train", "val"]  # one cache of each split, shared by the three seeds
    # The summary printed at the end is the mean and std of each checkpoint's validation metrics.
    lines = seeds_run["stdout"].splitlines()
    mean = next(line for line in lines if line.startswith("mean ")).split()[1:]
    std = next(line for line in lines if line.startswith("std ")).split()[1:]
    metrics = np.array([[rps.read_checkpoint(p)["metrics"][m] for m in seeds.SEED_SUMMARY_METRICS] for p in paths])
    assert np.allclose([float(v) for v in mean], metrics.mean(axis=0), atol=6e-5)
    assert np.allclose([float(v) for v in std], metrics.std(axis=0, ddof=1), atol=6e-5)


@pytest.mark.slow
def test_eval_over_several_checkpoints_prints_the_mean_and_std_of_their_own_tables(evaluated_seeds):
    out = evaluated_seeds["out"]
    own = [read_csv(out / f"{i + 1}_seed_{s}" / "eval_test.csv") for i, s in enumerate(SEEDS)]
    summary = read_csv(out / "eval_test_over_3_checkpoints.csv")
    assert [row["generator"] for row in summary] == [row["generator"] for row in own[0]]
    for position, row in enumerate(summary):
        for metric in ("acc", "ap", "auc", "real_acc", "fake_acc"):
            values = np.array([float(table[position][metric]) for table in own])
            if np.isnan(values).all():
                assert row[f"{metric}_mean"] == "nan"
                continue
            assert float(row[f"{metric}_mean"]) == pytest.approx(values.mean(), abs=6e-5), (row, metric)
            assert float(row[f"{metric}_std"]) == pytest.approx(values.std(ddof=1), abs=6e-5), (row, metric)
    assert "mean and standard deviation over 3 checkpoints" in evaluated_seeds["result"].stdout


@pytest.mark.slow
def test_per_image_scores_reproduce_the_table_with_sklearn(evaluated_seeds):
    folder = evaluated_seeds["out"] / "1_seed_0"
    table = {row["generator"]: row for row in read_csv(folder / "eval_test.csv")}
    scores = read_csv(folder / "eval_test_scores.csv")
    assert set(scores[0]) == set(rps.SCORE_COLUMNS)
    per_row, aps = {}, []
    for row in scores:
        per_row.setdefault(row["row"], []).append(row)
    for name, rows in per_row.items():
        labels = np.array([int(r["label"]) for r in rows])
        probs = np.array([float(r["p_fake"]) for r in rows])
        threshold, fake_when = float(rows[0]["threshold"]), rows[0]["fake_when"]
        fake = probs > threshold if fake_when == ">" else probs >= threshold
        assert float(table[name]["acc"]) == pytest.approx((fake == (labels == 1)).mean(), abs=6e-5)
        assert float(table[name]["ap"]) == pytest.approx(average_precision_score(labels, probs), abs=6e-5)
        assert float(table[name]["auc"]) == pytest.approx(roc_auc_score(labels, probs), abs=6e-5)
        aps.append(average_precision_score(labels, probs))
        # the raw column is sigmoid(logit); p_fake is at the checkpoint's temperature
        logits = np.array([float(r["logit"]) for r in rows])
        assert np.allclose([float(r["p_fake_raw"]) for r in rows], 1 / (1 + np.exp(-logits)), atol=1e-6)
    assert float(table["mean (2 generators)"]["ap"]) == pytest.approx(np.mean(aps), abs=6e-5)
    intervals = {row["row"]: row for row in read_csv(folder / "eval_test_intervals.csv")}
    for name in per_row:
        low, high = float(intervals[name]["ap_low"]), float(intervals[name]["ap_high"])
        assert low <= float(table[name]["ap"]) + 1e-4 and float(table[name]["ap"]) - 1e-4 <= high


def compare(args, cwd):
    return run_script(["compare", *args, "--out", "cmp", "--bootstrap", "200", "--device", "cpu", "--num-workers", "0"],
                      cwd=cwd)


@pytest.mark.slow
def test_compare_score_files_and_checkpoints_agree_and_match_the_tables(evaluated_seeds, seeds_run):
    root, out = evaluated_seeds["root"], evaluated_seeds["out"]
    files = [out / f"{i + 1}_seed_{s}" / "eval_test_scores.csv" for i, s in enumerate(SEEDS)]
    by_files = compare(["--a", *files[:2], "--b", files[2], "--names", "two", "one"], root)
    assert by_files.returncode == 0, by_files.stdout[-3000:] + by_files.stderr[-3000:]
    rows = {(r["generator"], r["metric"]): r for r in read_csv(root / "cmp" / "compare_two_vs_one.csv")}
    tables = [{row["generator"]: row for row in read_csv(f.parent / "eval_test.csv")} for f in files]
    for generator in ("bilinear", "transposed_conv", "mean (2 generators)"):
        a = np.mean([float(t[generator]["ap"]) for t in tables[:2]])
        b = float(tables[2][generator]["ap"])
        row = rows[(generator, "ap")]
        assert float(row["two_mean"]) == pytest.approx(a, abs=6e-5) and float(row["one_mean"]) == pytest.approx(b, abs=6e-5)
        assert float(row["difference"]) == pytest.approx(a - b, abs=1e-4)
        assert float(row["low"]) <= float(row["difference"]) + 1e-9 <= float(row["high"]) + 2e-9
    assert (root / "cmp" / "compare_two_vs_one.png").read_bytes()[:4] == b"\x89PNG"
    by_checkpoints = compare(["--a", *seeds_run["paths"][:2], "--b", seeds_run["paths"][2], "--names", "two", "one",
                              "--data", "data/test"], root)
    assert by_checkpoints.returncode == 0, by_checkpoints.stdout[-3000:] + by_checkpoints.stderr[-3000:]
    table = lambda text: [line for line in text.splitlines() if re.match(r"(bilinear|transposed_conv|mean) ", line)]  # noqa: E731
    assert table(by_checkpoints.stdout) == table(by_files.stdout) and table(by_files.stdout)


@pytest.mark.slow
def test_compare_refuses_other_images_or_protocols_in_one_line(evaluated_seeds, tmp_path):
    out = evaluated_seeds["out"]
    scores = out / "1_seed_0" / "eval_test_scores.csv"
    rows = read_csv(scores)

    def variant(name, change):
        changed = [dict(row) for row in rows]
        change(changed)
        path = tmp_path / name
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=rps.SCORE_COLUMNS)
            writer.writeheader()
            writer.writerows(changed)
        return path

    one_image_less = variant("fewer.csv", lambda r: r.pop(0))
    other_image = variant("other.csv", lambda r: r[0].update(path=r[0]["path"] + ".copy.png"))
    other_protocol = variant("protocol.csv", lambda r: [row.update(protocol="protocols/rine20.json") for row in r])
    for bad, message in ((one_image_less, "scored other images in row"), (other_image, "scored other images in row"),
                         (other_protocol, "was scored with protocol 'protocols/rine20.json'")):
        result = compare(["--a", scores, "--b", bad], tmp_path)
        assert result.returncode == 1, result.stdout[-2000:]
        lines = nonempty_lines(result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    checkpoint = compare(["--a", scores, "--b", out.parent / "runs" / "seed_0" / rps.BEST_NAME], tmp_path)
    assert checkpoint.returncode == 1 and "give --data" in checkpoint.stderr, checkpoint.stderr


@pytest.mark.slow
def test_resuming_seeds_finishes_the_finished_ones_at_once_and_starts_the_rest(seeds_run, tiny_backbone, capsys):
    root = seeds_run["root"]
    before = {p: p.stat().st_mtime_ns for p in seeds_run["paths"]}
    cfg = small_config(tiny_backbone, DATA_DIR=str(root / "data"), CHECKPOINT_DIR=str(root / "runs"), EPOCHS=1,
                       VAL_CLASSES="nearest", CACHE_FEATURES=True, CACHE_VIEWS=1, RESUME=True)
    paths = seeds.train_seeds(cfg, SEEDS + [7])
    out = capsys.readouterr().out
    assert paths[:3] == seeds_run["paths"] and all(p.stat().st_mtime_ns == before[p] for p in paths[:3])
    assert out.count("nothing left to do") == 3
    assert f"note: no {rps.LAST_NAME} in {root / 'runs' / 'seed_7'} to resume; seed 7 starts from the beginning" in out
    assert paths[3].is_file() and rps.checkpoint_config(rps.read_checkpoint(paths[3]))["SEED"] == 7


@pytest.mark.slow
def test_the_loss_log_covers_every_image_and_averages_to_the_epochs_losses(seeds_run):
    folder = seeds_run["paths"][0].parent
    rows = plots.read_loss_log(folder / rps.LOSS_LOG_NAME)
    history = rps.read_checkpoint(folder / rps.LAST_NAME)["history"]
    assert rows and [int(r["run_step"]) for r in rows] == sorted({int(r["run_step"]) for r in rows})
    for metrics in history:
        epoch_rows = [r for r in rows if r["epoch"] == metrics["epoch"]]
        images = sum(r["images"] for r in epoch_rows)
        assert images == 12 * 2  # every training image of the epoch (12 real + 12 fake bilinear; nearest validates)
        for column in ("train_bce", "train_supcon"):
            mean = sum(r[column] * r["images"] for r in epoch_rows) / images
            assert mean == pytest.approx(metrics[column], rel=1e-5), column
    assert (folder / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
