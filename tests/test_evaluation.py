"""Evaluation like the papers, inference on your own images, and the pictures.

The tiny checkpoint shared by the whole test run (conftest's trained_checkpoint) is used throughout; every
benchmark tree is generated here with make_demo_image, laid out like CNNDetection's test
set (<gen>/<category>/0_real|1_fake and <gen>/0_real|1_fake), GenImage (<gen>/val/nature|ai)
and UniversalFakeDetect (fake-only generators with a shared real folder). Every number the
`eval` command writes is checked against an independent computation: scores from
load_detector + predict, metrics from sklearn or counted by hand.
"""

import csv
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

import rine_plus_ssca as rps
from rine_plus_ssca_tools import heatmaps
from conftest import nonempty_lines, run_main, run_script

THRESHOLD = 0.5
# A value printed with 4 decimals can be off by half a unit in the last place; scores computed in
# another batch composition can differ by float32 rounding (far below this).
ROUNDED = 5e-5 + 1e-6
FLOAT_CELL = re.compile(r"^(nan|-?\d+\.\d{4})$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The CNNDetection test set (nested categories for some generators, flat for others) plus a GenImage
# generator. Folder -> (count, fake, upsampling method). Counts differ between classes, so a swapped
# n_real/n_fake or real_acc/fake_acc shows.
BENCHMARK = {
    "progan/car/0_real": (3, False, None),
    "progan/car/1_fake": (3, True, "nearest"),
    "progan/cat/0_real": (2, False, None),
    "progan/cat/1_fake": (3, True, "nearest"),
    "stylegan/0_real": (4, False, None),
    "stylegan/1_fake": (3, True, "bilinear"),
    "cyclegan/apple/0_real": (2, False, None),
    "cyclegan/apple/1_fake": (2, True, "transposed_conv"),
    "cyclegan/orange/0_real": (2, False, None),
    "cyclegan/orange/1_fake": (2, True, "bilinear"),
    "sdv1.4/val/nature": (3, False, None),
    "sdv1.4/val/ai": (4, True, "transposed_conv"),
}
GENERATORS = sorted({folder.split("/")[0] for folder in BENCHMARK})
MEAN = f"mean ({len(GENERATORS)} generators)"  # the mean row says how many rows it averages



def write_images(root, spec, seed):
    """root/<folder>/NNNN.png for each folder of spec; returns [(path, label, generator)] in writing order."""
    rng = np.random.default_rng(seed)
    written = []
    for folder, (count, fake, method) in spec.items():
        target = Path(root) / folder
        target.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = target / f"{i:04d}.png"
            Image.fromarray(rps.make_demo_image(rng, fake, method or "bilinear")).save(path)
            written.append((str(path), int(fake), folder.split("/")[0]))
    return written


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def hand_ece(labels, scores, n_bins=15):
    """ECE of P(fake) counted bin by bin: bin k holds k/15 <= P < (k+1)/15 (1.0 in the last one); each bin
    adds its share of the images times |its fraction of fakes - its mean P(fake)|."""
    total = 0.0
    for k in range(n_bins):
        members = [(label, s) for label, s in zip(labels, scores)
                   if k / n_bins <= s < (k + 1) / n_bins or (k == n_bins - 1 and s == 1.0)]
        if members:
            fraction_fake = sum(label for label, _ in members) / len(members)
            mean_p = sum(s for _, s in members) / len(members)
            total += len(members) / len(labels) * abs(fraction_fake - mean_p)
    return total


def hand_metrics(labels, scores, threshold=THRESHOLD):
    """The eval table's columns computed without rine_plus_ssca: counts, sklearn AP/AUC, accuracies and ECE counted."""
    labels, scores = np.asarray(labels, dtype=int), np.asarray(scores, dtype=np.float64)
    n = len(labels)
    n_fake = int(sum(1 for label in labels if label == 1))
    n_real = n - n_fake
    correct = sum(1 for label, s in zip(labels, scores) if (s >= threshold) == (label == 1))
    real_right = sum(1 for label, s in zip(labels, scores) if label == 0 and s < threshold)
    fake_right = sum(1 for label, s in zip(labels, scores) if label == 1 and s >= threshold)
    # Oracle accuracy: the best of every threshold that changes a decision (and +inf: everything real).
    best = max(sum(1 for label, s in zip(labels, scores) if (s >= t) == (label == 1))
               for t in list(np.unique(scores)) + [np.inf])
    both = n_real > 0 and n_fake > 0
    return {
        "n_real": n_real, "n_fake": n_fake,
        "acc": correct / n,
        "real_acc": real_right / n_real if n_real else math.nan,
        "fake_acc": fake_right / n_fake if n_fake else math.nan,
        "best_acc": best / n if both else math.nan,
        "ap": average_precision_score(labels, scores) if both else math.nan,
        "auc": roc_auc_score(labels, scores) if both else math.nan,
        "bin_ece": hand_ece(labels, scores),
        "skipped": 0,
    }


def hand_table(items, score_of, generators=None):
    """{generator: metrics} plus 'mean (N generators)' (counts summed, metrics averaged over generators)."""
    generators = generators or sorted({g for _, _, g in items})
    table = {}
    for generator in generators:
        chosen = [(label, score_of[path]) for path, label, g in items if g == generator]
        table[generator] = hand_metrics([c[0] for c in chosen], [c[1] for c in chosen])
    mean = {}
    for column in rps.METRIC_COLUMNS:
        values = [table[g][column] for g in generators]
        mean[column] = sum(values) if column in ("n_real", "n_fake", "skipped") else float(np.nanmean(values))
    table[f"mean ({len(generators)} generators)"] = mean
    return table


def assert_csv_block_matches(csv_rows, expected, condition, tolerance=ROUNDED):
    """The CSV rows of one condition equal the expected {generator: metrics} (to 4-decimal rounding)."""
    block = [row for row in csv_rows if row["condition"] == condition]
    mean = [name for name in expected if name.startswith("mean (")]
    assert [row["generator"] for row in block] == sorted(set(expected) - set(mean)) + mean, condition
    for row in block:
        want = expected[row["generator"]]
        for column in rps.METRIC_COLUMNS:
            cell, value = row[column], want[column]
            where = (condition, row["generator"], column, cell, value)
            if column in ("n_real", "n_fake", "skipped"):
                assert int(cell) == value, where
            else:
                assert FLOAT_CELL.match(cell), where
                if math.isnan(value):
                    assert cell == "nan", where
                else:
                    assert abs(float(cell) - value) <= tolerance, where


def rows_as_table(rows):
    """evaluate_folder's rows -> {generator: {column: value}}."""
    return {row[0]: dict(zip(rps.METRIC_COLUMNS, row[1:])) for row in rows}


def assert_is_png(path):
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100, path


def eval_command(ckpt, data, out, *extra, cwd):
    result = run_script(["eval", "--ckpt", ckpt, "--data", data, "--out", out, "--device", "cpu", *extra], cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    return result


# --------------------------------------------------------------------------- shared fixtures

@pytest.fixture(scope="module")
def trained(trained_checkpoint):
    """The test run's shared checkpoint (conftest) and what its training printed."""
    assert trained_checkpoint["best"].is_file()
    return dict(root=trained_checkpoint["root"], ckpt=trained_checkpoint["best"], stdout=trained_checkpoint["stdout"])


@pytest.fixture(scope="module")
def model(trained):
    return rps.load_detector(trained["ckpt"], device="cpu")


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory, model):
    """The CNNDetection/GenImage-style tree and each image's score from load_detector + predict."""
    root = tmp_path_factory.mktemp("bench")
    tree = root / "cnnd_test"
    items = write_images(tree, BENCHMARK, seed=11)
    paths = [path for path, _, _ in items]
    scores = rps.predict(model, paths, batch_size=8)
    assert scores.shape == (len(paths),)
    # The comparisons below only mean something if the model tells images apart.
    assert np.std(scores) > 1e-4, scores
    return dict(root=root, tree=tree, items=items, score_of=dict(zip(paths, scores.tolist())))


@pytest.fixture(scope="module")
def evaluated(trained, benchmark):
    """`eval` on the benchmark tree with the default number of workers and --target-fpr 0.1."""
    out = benchmark["root"] / "out"
    result = eval_command(trained["ckpt"], benchmark["tree"], out, "--batch-size", "8", "--target-fpr", "0.1",
                          cwd=benchmark["root"])
    return dict(out=out, result=result, csv=read_csv(out / "eval_cnnd_test.csv"))


# --------------------------------------------------------------------------- 1. the eval table

def test_eval_csv_matches_sklearn_and_counts_by_hand(model, benchmark, evaluated):
    assert model.config["THRESHOLD"] == THRESHOLD  # the command used the checkpoint's threshold
    rows = evaluated["csv"]
    assert list(rows[0].keys()) == ["condition", "generator"] + rps.METRIC_COLUMNS
    assert {row["condition"] for row in rows} == {"clean"}
    expected = hand_table(benchmark["items"], benchmark["score_of"])
    assert sorted(expected) == sorted(GENERATORS + [MEAN])
    # Counts straight from the layout, not from anything the script computed.
    for generator in GENERATORS:
        folders = {f: spec for f, spec in BENCHMARK.items() if f.split("/")[0] == generator}
        assert expected[generator]["n_real"] == sum(n for n, fake, _ in folders.values() if not fake)
        assert expected[generator]["n_fake"] == sum(n for n, fake, _ in folders.values() if fake)
    assert_csv_block_matches(rows, expected, "clean")
    # The mean row is the mean of the generator rows as written.
    generator_rows = [row for row in rows if row["generator"] != MEAN]
    mean_row = [row for row in rows if row["generator"] == MEAN][0]
    for column in ("acc", "real_acc", "fake_acc", "best_acc", "ap", "auc", "bin_ece"):
        average = np.mean([float(row[column]) for row in generator_rows])
        assert abs(float(mean_row[column]) - average) <= 2 * ROUNDED, column
    for column in ("n_real", "n_fake", "skipped"):
        assert int(mean_row[column]) == sum(int(row[column]) for row in generator_rows), column


def test_eval_writes_markdown_and_roc_pr_plot(evaluated):
    out = evaluated["out"]
    markdown = (out / "eval_cnnd_test.md").read_text()
    # the metrics table, before the table of its intervals
    table_lines = [line for line in markdown.split("95% intervals")[0].splitlines() if line.startswith("| ")]
    assert table_lines[0] == "| " + " | ".join(["generator"] + rps.METRIC_COLUMNS) + " |"
    assert sorted(line.split("|")[1].strip() for line in table_lines[1:]) == sorted(GENERATORS + [MEAN])
    for row in evaluated["csv"]:  # the same numbers as the CSV
        assert "| " + " | ".join(row[c] for c in ["generator"] + rps.METRIC_COLUMNS) + " |" in markdown
    assert_is_png(out / "eval_cnnd_test_roc_pr.png")


def test_evaluate_folder_agrees_with_the_hand_computation_at_full_precision(model, benchmark):
    rows, items, labels, probs, _ = rps.evaluate_folder(model, benchmark["tree"], batch_size=5, num_workers=0)
    generator_of = {path: g for path, _, g in benchmark["items"]}
    label_of = {path: label for path, label, _ in benchmark["items"]}
    assert sorted(item[0] for item in items) == sorted(generator_of)
    assert [label_of[item[0]] for item in items] == labels.tolist()
    # Its scores are predict's (another batch composition: float rounding only) ...
    np.testing.assert_allclose(probs, [benchmark["score_of"][item[0]] for item in items], rtol=1e-5, atol=1e-6)
    # ... and its metrics are exactly the hand computation on its own scores.
    own = dict(zip([item[0] for item in items], probs.tolist()))
    expected = hand_table(benchmark["items"], own)
    got = rows_as_table(rows)
    assert list(got) == GENERATORS + [MEAN]
    for generator, metrics in expected.items():
        for column, value in metrics.items():
            assert got[generator][column] == pytest.approx(value, abs=1e-12, nan_ok=True), (generator, column)


# --------------------------------------------------------------------------- 2. --real-dir

def test_real_dir_pairs_fake_only_generators_with_the_shared_reals(trained, model, tmp_path):
    # UniversalFakeDetect's diffusion sets: fake-only generators, one real folder for all of them.
    spec = {
        "laion/0_real": (5, False, None),
        "guided/1_fake": (3, True, "bilinear"),
        "ldm_200/1_fake": (4, True, "transposed_conv"),
        "progan/0_real": (2, False, None),  # has its own reals: keeps them
        "progan/1_fake": (2, True, "nearest"),
    }
    items = write_images(tmp_path / "diffusion", spec, seed=21)
    # Relative paths, as a user types them (the shared folder sits inside the tree and is no generator).
    result = eval_command(trained["ckpt"], "diffusion", "out", "--real-dir", "diffusion/laion", "--num-workers", "0",
                          cwd=tmp_path)
    rows = {row["generator"]: row for row in read_csv(tmp_path / "out" / "eval_diffusion_reals-laion.csv")}
    assert sorted(rows) == ["guided", "ldm_200", "mean (3 generators)", "progan"], result.stdout[-2000:]  # laion is no generator
    reals = [path for path, _, g in items if g == "laion"]
    score_of = dict(zip([p for p, _, _ in items], rps.predict(model, [p for p, _, _ in items]).tolist()))
    for generator, n_fake in (("guided", 3), ("ldm_200", 4)):
        row = rows[generator]
        assert (int(row["n_real"]), int(row["n_fake"])) == (len(reals), n_fake)
        assert row["ap"] != "nan" and 0.0 <= float(row["ap"]) <= 1.0
        fakes = [path for path, _, g in items if g == generator]
        labels = [0] * len(reals) + [1] * len(fakes)
        scores = [score_of[p] for p in reals + fakes]
        assert abs(float(row["ap"]) - average_precision_score(labels, scores)) <= ROUNDED
        assert abs(float(row["auc"]) - roc_auc_score(labels, scores)) <= ROUNDED
    assert (int(rows["progan"]["n_real"]), int(rows["progan"]["n_fake"])) == (2, 2)

    # A real folder outside the tree, images directly in it (no 0_real), works the same way.
    shared = tmp_path / "shared_reals"
    shutil.copytree(tmp_path / "diffusion" / "laion" / "0_real", shared)
    collected = rps.collect_test_items(tmp_path / "diffusion", real_dir=shared)
    for generator in ("guided", "ldm_200"):
        real_paths = sorted(p for p, label, g in collected if g == generator and label == 0)
        assert real_paths == sorted(str(p) for p in shared.iterdir())


# --------------------------------------------------------------------------- 3. --max-per-class

def test_max_per_class_is_a_seeded_sample_of_at_most_n(trained, model, benchmark, tmp_path):
    limit, seed = 2, 3
    eval_command(trained["ckpt"], benchmark["tree"], tmp_path / "out", "--max-per-class", limit, "--seed", seed,
                 "--num-workers", "0", cwd=tmp_path)
    rows = read_csv(tmp_path / "out" / f"eval_cnnd_test_max{limit}-seed{seed}.csv")
    full = hand_table(benchmark["items"], benchmark["score_of"])
    for row in rows:
        if not row["generator"].startswith("mean ("):
            assert int(row["n_real"]) == min(limit, full[row["generator"]]["n_real"]), row
            assert int(row["n_fake"]) == min(limit, full[row["generator"]]["n_fake"]), row

    # The sample is fixed by the seed: the same twice, a subset of the tree, at most N per (generator, class).
    sample = rps.collect_test_items(benchmark["tree"], max_per_class=limit, seed=seed)
    assert sample == rps.collect_test_items(benchmark["tree"], max_per_class=limit, seed=seed)
    all_items = {(p, label, g) for p, label, g in benchmark["items"]}
    assert set(sample) <= all_items and len(set(sample)) == len(sample)
    for key in {(g, label) for _, label, g in sample}:
        assert sum(1 for _, label, g in sample if (g, label) == key) <= limit
    others = [rps.collect_test_items(benchmark["tree"], max_per_class=limit, seed=s) for s in range(4, 10)]
    assert any(set(other) != set(sample) for other in others), "the seed does not change the sample"
    # ... and the command evaluated exactly that sample.
    expected = hand_table(sample, benchmark["score_of"])
    assert_csv_block_matches(rows, expected, "clean")


# --------------------------------------------------------------------------- 4. robustness

ROBUSTNESS = ["--jpeg-quality", "95,50", "--blur-sigma", "1", "--num-workers", "0", "--batch-size", "16"]
CONDITIONS = ["clean", "jpeg quality 95", "jpeg quality 50", "blur sigma 1.0"]
ROBUSTNESS_TABLE = "eval_cnnd_test_jpeg95-50_blur1.csv"  # named by the sweep, so another sweep does not overwrite it


@pytest.fixture(scope="module")
def robustness(trained, benchmark, tmp_path_factory):
    """The robustness sweep run twice, into two folders."""
    runs = []
    for name in ("first", "second"):
        out = tmp_path_factory.mktemp(f"robust_{name}")
        result = eval_command(trained["ckpt"], benchmark["tree"], out, *ROBUSTNESS, cwd=out)
        runs.append(dict(out=out, result=result))
    return runs


def test_robustness_sweep_has_one_block_per_level_and_plots(robustness, model, benchmark):
    out = robustness[0]["out"]
    rows = read_csv(out / ROBUSTNESS_TABLE)
    conditions = []
    for row in rows:
        if not conditions or conditions[-1] != row["condition"]:
            conditions.append(row["condition"])
    assert conditions == CONDITIONS
    for condition in CONDITIONS:
        assert [r["generator"] for r in rows if r["condition"] == condition] == GENERATORS + [MEAN], condition
    for kind in ("jpeg", "blur"):
        assert_is_png(out / f"eval_cnnd_test_jpeg95-50_blur1_robustness_{kind}.png")
    # Each block is what evaluate_folder gives under that perturbation.
    for condition, options in (("jpeg quality 50", dict(jpeg_quality=50)), ("blur sigma 1.0", dict(blur_sigma=1.0)),
                               ("clean", {})):
        reference = rows_as_table(rps.evaluate_folder(model, benchmark["tree"], batch_size=16, num_workers=0, **options)[0])
        assert_csv_block_matches(rows, reference, condition)


def test_robustness_sweep_is_deterministic(robustness):
    first, second = (run["out"] / ROBUSTNESS_TABLE for run in robustness)
    assert first.read_bytes() == second.read_bytes()


def test_perturbations_are_applied_and_fixed(model, benchmark):
    image = rps.open_image(benchmark["items"][0][0])
    original = np.asarray(image, dtype=np.int16)
    for options in (dict(jpeg_quality=50), dict(jpeg_quality=95), dict(blur_sigma=1.0)):
        perturbed = np.asarray(rps.FixedPerturbation(**options)(image), dtype=np.int16)
        assert perturbed.shape == original.shape, options
        assert np.abs(perturbed - original).mean() > 0.1, f"{options} left the pixels unchanged"
        again = np.asarray(rps.FixedPerturbation(**options)(image), dtype=np.int16)
        assert np.array_equal(perturbed, again), f"{options} is not deterministic"
    assert np.array_equal(np.asarray(rps.FixedPerturbation()(image), dtype=np.int16), original)
    # Scores move when the test images are JPEG-compressed: the perturbation reaches the model.
    items = benchmark["items"]
    clean, _, _ = rps.score_items(model, items, batch_size=16, num_workers=0)
    jpeg, _, _ = rps.score_items(model, items, batch_size=16, num_workers=0, jpeg_quality=50)
    assert clean.keys() == jpeg.keys()
    assert max(abs(clean[p] - jpeg[p]) for p in clean) > 1e-4


# --------------------------------------------------------------------------- 5. --target-fpr

def test_target_fpr_threshold(evaluated, model, benchmark):
    match = re.search(r"threshold for a false-positive rate of 0\.1 on these real images: (\d\.\d{4}) "
                      r"\(fake recall there: (\d\.\d{4})\)", evaluated["result"].stdout)
    assert match, evaluated["result"].stdout[-3000:]
    printed, recall = float(match.group(1)), float(match.group(2))
    _, items, labels, probs, _ = rps.evaluate_folder(model, benchmark["tree"], batch_size=8, num_workers=0)
    reals, fakes = probs[labels == 0], probs[labels == 1]
    t = rps.threshold_for_fpr(reals, 0.1)
    assert abs(printed - t) <= ROUNDED
    assert abs(recall - np.mean(fakes >= t)) <= ROUNDED
    # At most 10% of the real images are called fake at t ...
    assert np.sum(reals >= t) <= 0.1 * len(reals)
    # ... and t is the smallest such threshold: the real score just below it would call more reals fake,
    # and no number lies between the two.
    below = reals[reals < t]
    assert len(below), "every real image is above the threshold"
    highest_below = below.max()
    assert np.sum(reals >= highest_below) > 0.1 * len(reals)
    assert t == np.nextafter(highest_below, np.inf)


def test_threshold_for_fpr_on_known_scores():
    rng = np.random.default_rng(0)
    for n in (1, 7, 10, 33):
        reals = rng.uniform(size=n)
        for fpr in (0.0, 0.05, 0.1, 0.5, 0.99):
            t = rps.threshold_for_fpr(reals, fpr)
            assert np.sum(reals >= t) <= fpr * n, (n, fpr)
            # Lowering t to the next real score below it breaks the bound (t is the smallest allowed).
            lower = reals[reals < t]
            if len(lower):
                assert np.sum(reals >= lower.max()) > fpr * n, (n, fpr)
        assert rps.threshold_for_fpr(reals, 1.0) == 0.0


# --------------------------------------------------------------------------- 6. predict on your own images

def write_own_images(folder):
    """Every kind of file a user may point predict at. Returns (readable {name: image as predict should see it},
    unreadable names)."""
    folder.mkdir()
    rng = np.random.default_rng(31)
    photo = rps.make_demo_image(rng, False, size=256)
    readable = {}

    gray = Image.fromarray(photo[..., 0], mode="L")
    gray.save(folder / "gray.png")
    readable["gray.png"] = gray
    rgba = Image.fromarray(np.dstack([photo, rng.integers(0, 256, photo.shape[:2], dtype=np.uint8)]), mode="RGBA")
    rgba.save(folder / "rgba.png")
    readable["rgba.png"] = rgba
    Image.fromarray(photo).convert("P").save(folder / "palette.gif")
    readable["palette.gif"] = Image.open(folder / "palette.gif")
    # 16-bit grayscale whose values are exactly 257 x an 8-bit image: it must score like that 8-bit image.
    eight_bit = rps.make_demo_image(rng, True, "nearest", size=240)[..., 1]
    sixteen = Image.fromarray(eight_bit.astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    sixteen.save(folder / "gray16.png")
    readable["gray16.png"] = Image.fromarray(eight_bit, mode="L")
    Image.fromarray(photo).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    readable["cmyk.jpg"] = Image.open(folder / "cmyk.jpg")
    Image.fromarray(photo).save(folder / "photo.webp", quality=90)
    readable["photo.webp"] = Image.open(folder / "photo.webp")
    Image.fromarray(photo[:10, :10]).save(folder / "tiny.png")
    readable["tiny.png"] = Image.open(folder / "tiny.png")
    large = rps.make_demo_image(rng, False, size=600)[:500]  # 600 wide, 500 high
    Image.fromarray(large).save(folder / "large.jpg", quality=92)
    readable["large.jpg"] = Image.open(folder / "large.jpg")

    (folder / "text.png").write_text("<html>not an image</html>\n")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes((folder / "large.jpg").read_bytes()[:4000])
    (folder / "notes.txt").write_text("my notes\n")
    return readable, ["text.png", "empty.jpg", "truncated.jpg"]


PREDICT_LINE = re.compile(r"^\s*(\d\.\d{4}|\d\.\de-\d+|-)\s+(real|fake|skipped)\s+(\S+)(?: \(not a readable image\))?$")


def parse_predict_output(stdout):
    """{file name: (score text, verdict)} from predict's per-image lines."""
    lines = {}
    for line in stdout.splitlines():
        match = PREDICT_LINE.match(line)
        if match:
            name = Path(match.group(3)).name
            assert name not in lines, f"{name} printed twice"
            lines[name] = (match.group(1), match.group(2))
    return lines


@pytest.fixture(scope="module")
def own_images(tmp_path_factory, trained, model):
    root = tmp_path_factory.mktemp("own")
    readable, unreadable = write_own_images(root / "mine")
    results = {}
    for name, extra in (("plain", ["--explain", "heatmaps"]), ("tencrop", ["--tencrop"])):
        result = run_main(["predict", "--ckpt", trained["ckpt"], "mine", "--out", f"{name}.csv", "--device", "cpu",
                           "--num-workers", "0", *extra], cwd=root)
        results[name] = result
    return dict(root=root, readable=readable, unreadable=unreadable, results=results)


@pytest.mark.parametrize("mode", ["plain", "tencrop"])
def test_predict_scores_every_kind_of_image_and_skips_the_rest(own_images, model, mode):
    result = own_images["results"][mode]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    readable, unreadable = own_images["readable"], own_images["unreadable"]
    lines = parse_predict_output(result.stdout)
    assert sorted(lines) == sorted(list(readable) + unreadable), result.stdout  # one line per image file, no notes.txt
    expected = rps.predict(model, list(readable.values()), tencrop=mode == "tencrop")
    expected = dict(zip(readable, expected.tolist()))
    for name in unreadable:
        assert lines[name] == ("-", "skipped"), (name, lines[name])
    for name, p in expected.items():
        score, verdict = lines[name]
        assert 0.0 <= float(score) <= 1.0, name
        assert abs(float(score) - p) <= ROUNDED, (name, score, p)
        if abs(p - THRESHOLD) > 1e-4:
            assert verdict == ("fake" if p >= THRESHOLD else "real"), (name, score, verdict)
    assert f"{len(readable)} images scored" in result.stdout and f"{len(unreadable)} unreadable skipped" in result.stdout
    # The CSV has the same rows.
    rows = read_csv(own_images["root"] / f"{mode}.csv")
    assert len(rows) == len(lines)
    for row in rows:
        score, verdict = lines[Path(row["path"]).name]
        if verdict == "skipped":
            assert row["p_fake"] == "" and row["verdict"] == "unreadable", row
        else:
            assert abs(float(row["p_fake"]) - float(score)) <= ROUNDED and row["verdict"] == verdict, row


def test_predict_explain_draws_each_readable_image_and_reports_the_broken_ones(own_images, model):
    result = own_images["results"]["plain"]
    readable, unreadable = own_images["readable"], own_images["unreadable"]
    pictures = sorted((own_images["root"] / "heatmaps").iterdir())
    # One per readable image (none for the broken), named with the image's extension: x.jpg -> x_jpg.png.
    assert [p.name for p in pictures] == sorted(Path(name).stem + Path(name).suffix.replace(".", "_") + ".png"
                                                for name in readable)
    assert "note: heatmaps run the backbone once more per image on the CPU" in result.stderr  # said before they start
    for picture in pictures:
        with Image.open(picture) as drawn:
            assert drawn.format == "PNG" and drawn.width > 400
    assert f"wrote {len(readable)} heatmaps in heatmaps (unreadable images have none)" in result.stdout
    lines = parse_predict_output(result.stdout)
    assert all(lines[name] == ("-", "skipped") for name in unreadable)  # still reported, not drawn
    # Each picture's P(fake) is the one predict printed (the same centre crop, no --tencrop).
    explanations = heatmaps.explain(model, list(readable.values()))
    for name, explanation in zip(readable, explanations):
        assert abs(explanation.p_fake - float(lines[name][0])) <= ROUNDED, name
        assert explanation.local_p_fake.shape == (28, 28) and explanation.crop.shape == (224, 224, 3)


def sigmoid_of_mean_logit(probs):
    """Ten crops' P(fake) -> the sigmoid of the mean of their logits (logit(P) = logit / T, so any temperature)."""
    probs = np.asarray(probs, dtype=np.float64)
    return float(1 / (1 + np.exp(-np.mean(np.log(probs / (1 - probs))))))


def test_tencrop_averages_the_ten_crops(own_images, model):
    """RINE's test-time averaging: four corners and the centre, each also mirrored, on the 8-pixel grid;
    P(fake) is the sigmoid of the mean of their logits."""
    plain = {Path(r["path"]).name: float(r["p_fake"]) for r in read_csv(own_images["root"] / "plain.csv") if r["p_fake"]}
    tencrop = {Path(r["path"]).name: float(r["p_fake"]) for r in read_csv(own_images["root"] / "tencrop.csv") if r["p_fake"]}
    large = rps.load_rgb(own_images["readable"]["large.jpg"])
    assert large.size == (600, 500)
    s, (w, h) = 224, large.size
    grid = lambda v: v // 8 * 8  # noqa: E731  (crops start on the image's 8-pixel grid, as in training)
    corners = [(0, 0), (grid(w - s), 0), (0, grid(h - s)), (grid(w - s), grid(h - s)), (grid((w - s) // 2), grid((h - s) // 2))]
    crops = [large.crop((x, y, x + s, y + s)) for x, y in corners]
    crops += [crop.transpose(Image.FLIP_LEFT_RIGHT) for crop in crops]
    assert abs(tencrop["large.jpg"] - sigmoid_of_mean_logit(rps.predict(model, crops))) <= ROUNDED
    assert abs(plain["large.jpg"] - float(rps.predict(model, crops[4])[0])) <= ROUNDED  # without: the centre crop
    assert abs(plain["large.jpg"] - tencrop["large.jpg"]) > 1e-6
    # A small image is padded to one crop: the ten crops are it and its mirror, five times each.
    tiny = rps.load_rgb(own_images["readable"]["tiny.png"])
    padded = rps.PadToAtLeast(s)(tiny)
    mirrored = sigmoid_of_mean_logit(rps.predict(model, [padded, padded.transpose(Image.FLIP_LEFT_RIGHT)]))
    assert abs(tencrop["tiny.png"] - mirrored) <= ROUNDED
    assert abs(plain["tiny.png"] - float(rps.predict(model, tiny)[0])) <= ROUNDED


def test_16_bit_images_are_scaled_not_saturated(tmp_path):
    mid = Image.fromarray(np.full((32, 48), 128 * 257, dtype=np.uint16))
    assert mid.mode == "I;16"
    mid.save(tmp_path / "mid16.png")
    for loaded in (rps.load_rgb(mid), rps.load_rgb(tmp_path / "mid16.png"), rps.open_image(tmp_path / "mid16.png")):
        pixels = np.asarray(loaded)
        assert loaded.mode == "RGB" and pixels.shape == (32, 48, 3)
        assert np.all(pixels == 128), np.unique(pixels)
    ramp = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0, 257, ..., 65535
    assert np.array_equal(np.asarray(rps.load_rgb(Image.fromarray(ramp)))[..., 0], np.arange(256).reshape(16, 16))


# --------------------------------------------------------------------------- 8. pictures

def tie_ranking(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("TIE block importance (top")]
    assert len(lines) == 1, stdout[-3000:]
    return [(int(b), float(w)) for b, w in re.findall(r"block (\d+): (\d\.\d{3})", lines[0])]


def test_training_writes_pictures_and_prints_block_importance(trained, model):
    ckpt_dir = trained["ckpt"].parent
    assert_is_png(ckpt_dir / "training_curves.png")
    assert_is_png(ckpt_dir / "tie_block_importance.png")
    ranking = tie_ranking(trained["stdout"])
    weights = model.block_importance().numpy()
    blocks = model.backbone.blocks
    assert len(ranking) == min(5, len(blocks))
    assert [w for _, w in ranking] == sorted((w for _, w in ranking), reverse=True)
    for block, weight in ranking:
        assert abs(weight - weights[blocks.index(block)]) <= 5e-4, (block, weight)
    assert sum(weights) == pytest.approx(1.0, abs=1e-5)


def test_eval_prints_block_importance_and_plots_it(evaluated, trained):
    assert tie_ranking(evaluated["result"].stdout) == tie_ranking(trained["stdout"])
    assert_is_png(evaluated["out"] / f"tie_block_importance_{trained['ckpt'].stem}.png")  # not training's picture


def test_eval_refuses_a_table_whose_row_lost_too_many_images(tmp_path, make_cfg):
    import torch

    spec = {"good/0_real": (4, False, None), "good/1_fake": (4, True, "nearest"),
            "whole/0_real": (4, False, None), "whole/1_fake": (4, True, "bilinear")}
    write_images(tmp_path / "data", spec, seed=0)
    (tmp_path / "data/good/1_fake/broken.png").write_bytes(b"")  # 1 of the row's 9 images: 11%
    for max_fraction in (0.05, 0.2):
        torch.manual_seed(0)
        model = rps.RINEPlusSSCA(make_cfg(MAX_BAD_FRACTION=max_fraction)).eval()
        rps.atomic_torch_save(rps.make_checkpoint(model, 1, {}, []), tmp_path / f"model_{max_fraction}.pth")
        result = run_main(["eval", "--ckpt", f"model_{max_fraction}.pth", "--data", "data", "--out", "out",
                           "--device", "cpu", "--num-workers", "0"], cwd=tmp_path)
        assert "Traceback" not in result.stdout + result.stderr
        # The table shows the skipped images per row, whether or not it is refused.
        skipped = {line.split()[0]: line.split()[-1] for line in result.stdout.split("95% intervals")[0].splitlines()
                   if line.split() and line.split()[0] in ("good", "whole")}
        assert skipped == {"good": "1", "whole": "0"}, result.stdout
        if max_fraction == 0.05:
            assert result.returncode == 1, result.stdout[-2000:]
            errors = [line for line in nonempty_lines(result.stderr) if not line.startswith("warning: ")]
            assert len(errors) == 1 and errors[0].startswith("error: 1 of 9 images of the row 'good' [clean] could not "
                                                             "be scored (more than MAX_BAD_FRACTION=0.05)"), result.stderr
            assert "check-data --data data" in errors[0]
            assert not (tmp_path / "out" / "eval_data.csv").exists()
        else:
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
