"""The papers' evaluation protocol: one row per generator, the right reals in each row, the mean of
two-class rows only, the shipped protocol files, and the resize sweep.

Every benchmark tree is generated here with make_demo_image in the layout of one benchmark:
ForenSynths (`<gen>/<category>/0_real|1_fake` and `<gen>/0_real|1_fake`), UniversalFakeDetect's
`diffusion_datasets` (fake-only generators, shared `imagenet` and `laion` reals), GenImage
(`<gen>/val/nature|ai`) and Synthbuster (`<gen>/*.png` with the reals in a separate RAISE folder).
Which images should land in which row is written down here from the layout; each image's score
comes from load_detector + predict, and the metrics from scikit-learn.
"""

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

import rine_plus_ssca as rps
from rine_plus_ssca_tools import protocols
from conftest import REPO, run_main, run_script

THRESHOLD = 0.5
ROUNDED = 5e-5 + 1e-6  # a value printed with 4 decimals
RINE20 = REPO / "protocols" / "rine20.json"
SYNTHBUSTER = REPO / "protocols" / "synthbuster.json"
GENIMAGE = REPO / "protocols" / "genimage.json"

# RINE's 20 test sets as RINE's code names them (mever-team/rine, src/utils.py get_generators), in its order.
RINE_GENERATORS = ["progan", "stylegan", "stylegan2", "biggan", "cyclegan", "stargan", "gaugan", "deepfake",
                   "seeingdark", "san", "crn", "imle", "diffusion_datasets/guided", "diffusion_datasets/ldm_200",
                   "diffusion_datasets/ldm_200_cfg", "diffusion_datasets/ldm_100", "diffusion_datasets/glide_100_27",
                   "diffusion_datasets/glide_50_27", "diffusion_datasets/glide_100_10", "diffusion_datasets/dalle"]
# GenImage's 8 test sets as its paper's tables name them, in their order; the folders as the download unpacks.
GENIMAGE_FOLDERS = {"Midjourney": "Midjourney/imagenet_midjourney", "SD V1.4": "stable_diffusion_v_1_4/imagenet_ai_0419_sdv4",
                    "SD V1.5": "stable_diffusion_v_1_5/imagenet_ai_0424_sdv5", "ADM": "ADM/imagenet_ai_0508_adm",
                    "GLIDE": "glide/imagenet_glide", "Wukong": "wukong/imagenet_ai_0424_wukong",
                    "VQDM": "VQDM/imagenet_ai_0419_vqdm", "BigGAN": "BigGAN/imagenet_ai_0419_biggan"}
SYNTHBUSTER_GENERATORS = ["dalle2", "dalle3", "stable-diffusion-1-3", "stable-diffusion-1-4", "stable-diffusion-2",
                          "stable-diffusion-xl", "glide", "firefly", "midjourney-v5"]


def write_images(root, spec, seed):
    """root/<folder>/NNNN.png, `count` images per folder, fakes where `fake`; returns {folder: [paths]}."""
    rng = np.random.default_rng(seed)
    written = {}
    for folder, (count, fake) in spec.items():
        target = Path(root) / folder
        target.mkdir(parents=True, exist_ok=True)
        written[folder] = []
        for i in range(count):
            path = target / f"{i:04d}.png"
            Image.fromarray(rps.make_demo_image(rng, fake, "nearest" if i % 2 else "transposed_conv")).save(path)
            written[folder].append(str(path))
    return written


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected_row(reals, fakes, score_of):
    """The table's columns for these images, without rine_plus_ssca: counted, and AP/AUC from sklearn."""
    labels = [0] * len(reals) + [1] * len(fakes)
    scores = [score_of[p] for p in reals + fakes]
    called_fake = [s >= THRESHOLD for s in scores]
    both = bool(reals) and bool(fakes)
    return {
        "n_real": len(reals), "n_fake": len(fakes),
        "acc": sum(c == (label == 1) for c, label in zip(called_fake, labels)) / len(labels),
        "real_acc": sum(not c for c in called_fake[:len(reals)]) / len(reals) if reals else math.nan,
        "fake_acc": sum(called_fake[len(reals):]) / len(fakes) if fakes else math.nan,
        "ap": average_precision_score(labels, scores) if both else math.nan,
        "auc": roc_auc_score(labels, scores) if both else math.nan,
    }


def assert_row_matches(row, want, tolerance, where):
    """A table row (dict of column -> number or CSV text) equals the expected metrics."""
    for column, value in want.items():
        got = row[column]
        got = float(got) if isinstance(got, str) else got
        if column in ("n_real", "n_fake"):
            assert int(got) == value, (where, column, got, value)
        elif math.isnan(value):
            assert math.isnan(got), (where, column, got)
        else:
            assert abs(got - value) <= tolerance, (where, column, got, value)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trained(trained_checkpoint):
    """The path of the test run's shared checkpoint (conftest)."""
    return trained_checkpoint["best"]


@pytest.fixture(scope="module")
def model(trained):
    return rps.load_detector(trained, device="cpu")


def scores_of(model, written):
    """{path: P(fake)} from predict, for every image written."""
    paths = [p for paths in written.values() for p in paths]
    scores = rps.predict(model, paths, batch_size=16)
    assert np.std(scores) > 1e-4, scores  # the model tells images apart, so comparisons mean something
    return dict(zip(paths, scores.tolist()))


# --------------------------------------------------------------------------- 1. each layout, one row per generator

# name -> (folders written: {folder: (count, fake)}, where --data points, extra evaluate_folder arguments,
#          expected rows in order: {row: (real folders, fake folders)})
LAYOUTS = {
    "forensynths_categories": (
        {"progan/car/0_real": (2, False), "progan/car/1_fake": (3, True), "progan/cat/0_real": (3, False),
         "progan/cat/1_fake": (2, True), "cyclegan/apple/0_real": (2, False), "cyclegan/apple/1_fake": (2, True),
         "cyclegan/orange/0_real": (1, False), "cyclegan/orange/1_fake": (3, True)},
        ".", {},
        {"cyclegan": (["cyclegan/apple/0_real", "cyclegan/orange/0_real"], ["cyclegan/apple/1_fake", "cyclegan/orange/1_fake"]),
         "progan": (["progan/car/0_real", "progan/cat/0_real"], ["progan/car/1_fake", "progan/cat/1_fake"])}),
    "forensynths_flat": (
        {"biggan/0_real": (3, False), "biggan/1_fake": (2, True), "crn/0_real": (2, False), "crn/1_fake": (4, True)},
        ".", {},
        {"biggan": (["biggan/0_real"], ["biggan/1_fake"]), "crn": (["crn/0_real"], ["crn/1_fake"])}),
    "diffusion_datasets_protocol": (
        {"diffusion_datasets/guided/1_fake": (3, True), "diffusion_datasets/ldm_200/1_fake": (2, True),
         "diffusion_datasets/glide_100_27/1_fake": (2, True), "diffusion_datasets/dalle/1_fake": (3, True),
         "diffusion_datasets/imagenet/0_real": (2, False), "diffusion_datasets/laion/0_real": (4, False)},
        ".", {"protocol": RINE20},
        {"diffusion_datasets/guided": (["diffusion_datasets/imagenet/0_real"], ["diffusion_datasets/guided/1_fake"]),
         "diffusion_datasets/ldm_200": (["diffusion_datasets/laion/0_real"], ["diffusion_datasets/ldm_200/1_fake"]),
         "diffusion_datasets/glide_100_27": (["diffusion_datasets/laion/0_real"], ["diffusion_datasets/glide_100_27/1_fake"]),
         "diffusion_datasets/dalle": (["diffusion_datasets/laion/0_real"], ["diffusion_datasets/dalle/1_fake"])}),
    "genimage": (
        {"sdv1.4/val/nature": (3, False), "sdv1.4/val/ai": (2, True), "midjourney/nature": (2, False),
         "midjourney/ai": (3, True)},
        ".", {},
        {"midjourney": (["midjourney/nature"], ["midjourney/ai"]), "sdv1.4": (["sdv1.4/val/nature"], ["sdv1.4/val/ai"])}),
    "synthbuster_protocol": (
        {"synthbuster/dalle2": (3, True), "synthbuster/firefly": (2, True), "synthbuster/midjourney-v5": (2, True),
         "RAISEpng": (4, False)},
        "synthbuster", {"protocol": SYNTHBUSTER},
        {"dalle2": (["RAISEpng"], ["synthbuster/dalle2"]), "firefly": (["RAISEpng"], ["synthbuster/firefly"]),
         "midjourney-v5": (["RAISEpng"], ["synthbuster/midjourney-v5"])}),
    "synthbuster_real_dir": (  # the simple case: no protocol, --real-dir, fakes in no label folder
        {"synthbuster/dalle2": (3, True), "synthbuster/firefly": (2, True), "RAISE elsewhere/png": (3, False)},
        "synthbuster", {"real_dir": "RAISE elsewhere/png"},
        {"dalle2": (["RAISE elsewhere/png"], ["synthbuster/dalle2"]), "firefly": (["RAISE elsewhere/png"], ["synthbuster/firefly"])}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_gives_one_row_per_generator_with_its_reals(model, tmp_path, layout, capsys):
    spec, data, options, expected = LAYOUTS[layout]
    written = write_images(tmp_path, spec, seed=len(layout))
    score_of = scores_of(model, written)
    options = {key: (tmp_path / value if key == "real_dir" else value) for key, value in options.items()}
    rows, items, labels, probs, _ = rps.evaluate_folder(model, tmp_path / data, batch_size=8, num_workers=0, **options)

    # Each row holds exactly the images of its folders, with the right labels.
    assert [row[0] for row in rows] == list(expected) + [f"mean ({len(expected)} generators)"]
    for name, (real_folders, fake_folders) in expected.items():
        reals = sorted(p for folder in real_folders for p in written[folder])
        fakes = sorted(p for folder in fake_folders for p in written[folder])
        assert sorted(str(p) for p, label, row in items if row == name and label == 0) == reals, name
        assert sorted(str(p) for p, label, row in items if row == name and label == 1) == fakes, name
        # The metrics are sklearn's on predict's scores (another batch composition: float rounding only).
        table_row = dict(zip(rps.METRIC_COLUMNS, rows[[row[0] for row in rows].index(name)][1:]))
        assert_row_matches(table_row, expected_row(reals, fakes, score_of), 1e-5, name)
    n_images = sum(len(written[folder]) for reals, fakes in expected.values() for folder in reals + fakes)
    assert len(items) == len(labels) == len(probs) == n_images  # nothing else, shared reals once per row
    # The mean row averages the generator rows and sums their counts.
    mean = dict(zip(rps.METRIC_COLUMNS, rows[-1][1:]))
    generator_rows = [dict(zip(rps.METRIC_COLUMNS, row[1:])) for row in rows[:-1]]
    for column in ("acc", "real_acc", "fake_acc", "best_acc", "ap", "auc", "bin_ece"):
        assert mean[column] == pytest.approx(np.mean([row[column] for row in generator_rows]), abs=1e-12), column
    assert mean["n_real"] == sum(row["n_real"] for row in generator_rows)
    assert mean["n_fake"] == sum(row["n_fake"] for row in generator_rows)
    if options.get("protocol") is not None:
        # A part of a benchmark gives a table of that part; each missing folder is named.
        err = capsys.readouterr().err
        names = json.loads(Path(options["protocol"]).read_text())["rows"]
        absent = [row["name"] for row in names if row["name"] not in expected]
        assert f"{len(absent)} of the {len(names)} rows of {options['protocol']} have no images under" in err
        assert f"and are left out: {', '.join(absent)}\n" in err
        assert "warning: no folder" not in err  # every real folder a present row needs is there


# --------------------------------------------------------------------------- 2. RINE's 20 sets, in RINE's order

RINE_TREE = {
    **{f"{g}/{c}/{label}": (1, label == "1_fake") for g in ("progan", "stylegan", "stylegan2", "cyclegan")
       for c in ("car", "cat") for label in ("0_real", "1_fake")},
    **{f"{g}/{label}": (1 + (label == "1_fake"), label == "1_fake")
       for g in ("biggan", "stargan", "gaugan", "deepfake", "seeingdark", "san", "crn", "imle")
       for label in ("0_real", "1_fake")},
    **{f"diffusion_datasets/{g.split('/')[1]}/1_fake": (2, True) for g in RINE_GENERATORS[12:]},
    "diffusion_datasets/imagenet/0_real": (2, False),
    "diffusion_datasets/laion/0_real": (3, False),
}


def test_rine20_protocol_prints_rines_table(trained, model, tmp_path):
    written = write_images(tmp_path / "data" / "test", RINE_TREE, seed=20)
    result = run_script(["eval", "--ckpt", trained, "--data", "data/test", "--protocol", RINE20, "--out", "out",
                         "--device", "cpu", "--num-workers", "0", "--batch-size", "16"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "warning: no folder" not in result.stderr  # every folder is there
    rows = read_csv(tmp_path / "out" / "eval_test_rine20.csv")
    assert [row["generator"] for row in rows] == RINE_GENERATORS + ["mean (20 generators)"]
    printed = [line.split()[0] for line in result.stdout.split("95% intervals")[0].splitlines() if line.split()[:1] and
               line.split()[0] in RINE_GENERATORS]
    assert printed == RINE_GENERATORS  # the printed table has the same order
    score_of = scores_of(model, written)
    by_name = {row["generator"]: row for row in rows}
    for name in RINE_GENERATORS:
        if name.startswith("diffusion_datasets/"):
            real_folder = "imagenet" if name.endswith("guided") else "laion"
            reals = written[f"diffusion_datasets/{real_folder}/0_real"]
            fakes = written[f"{name}/1_fake"]
        else:
            reals = [p for folder, paths in written.items() if folder.startswith(name + "/") and "0_real" in folder for p in paths]
            fakes = [p for folder, paths in written.items() if folder.startswith(name + "/") and "1_fake" in folder for p in paths]
        assert_row_matches(by_name[name], expected_row(reals, fakes, score_of), ROUNDED, name)
    assert int(by_name["progan"]["n_real"]) == 2 and int(by_name["diffusion_datasets/dalle"]["n_real"]) == 3


def test_shipped_protocols_name_rines_sets_and_folders():
    rine = protocols.read_protocol(RINE20)
    assert [row["name"] for row in rine["rows"]] == RINE_GENERATORS
    for row in rine["rows"][12:]:
        shared = "diffusion_datasets/imagenet" if row["name"].endswith("guided") else "diffusion_datasets/laion"
        assert row["fake"] == row["name"] and row["real"] == shared, row
    synthbuster = protocols.read_protocol(SYNTHBUSTER)
    assert [row["name"] for row in synthbuster["rows"]] == SYNTHBUSTER_GENERATORS
    assert synthbuster["real_dir"] == "../RAISEpng"  # RINE's data/synthbuster next to data/RAISEpng


# --------------------------------------------------------------------------- 3. one-class rows stay out of the mean

def test_one_class_rows_never_enter_the_mean(model, tmp_path):
    written = write_images(tmp_path / "test", {"biggan/0_real": (3, False), "biggan/1_fake": (3, True),
                                               "whichfaceisreal/1_fake": (4, True), "laion/0_real": (3, False)}, seed=3)
    score_of = scores_of(model, written)
    rows = rps.evaluate_folder(model, tmp_path / "test", batch_size=8, num_workers=0)[0]
    names = [row[0] for row in rows]
    assert names == ["biggan", "laion (reals only)", "whichfaceisreal (fakes only)", "mean (1 generator)"]
    biggan = expected_row(written["biggan/0_real"], written["biggan/1_fake"], score_of)
    # The mean is biggan's row alone (counts included), whatever the one-class rows score.
    assert_row_matches(dict(zip(rps.METRIC_COLUMNS, rows[-1][1:])), biggan, 1e-5, "mean")
    assert rows[-1][1:] == rows[0][1:]
    fakes_only = dict(zip(rps.METRIC_COLUMNS, rows[2][1:]))
    assert_row_matches(fakes_only, expected_row([], written["whichfaceisreal/1_fake"], score_of), 1e-5, "fakes only")


def test_eval_on_fakes_only_says_how_to_pair_reals(trained, tmp_path):
    """A folder of fakes alone: a row named after the folder, no mean row of nan, a note naming --real-dir."""
    write_images(tmp_path / "my_fakes", {"fake": (3, True)}, seed=4)
    result = run_script(["eval", "--ckpt", trained, "--data", "my_fakes", "--out", "out", "--device", "cpu",
                         "--num-workers", "0"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_csv(tmp_path / "out" / "eval_my_fakes.csv")
    assert [row["generator"] for row in rows] == ["my_fakes (fakes only)"]
    assert rows[0]["n_fake"] == "3" and rows[0]["fake_acc"] != "nan" and rows[0]["ap"] == "nan"
    assert re.search(r"note: .*one class only.*--real-dir.*--protocol", result.stdout), result.stdout[-2000:]
    assert not (tmp_path / "out" / "eval_my_fakes_roc_pr.png").exists()  # no empty plot


# --------------------------------------------------------------------------- 4. protocol files: mistakes

def test_protocol_mistakes_are_one_line_errors(tmp_path, trained):
    write_images(tmp_path / "test", {"biggan/0_real": (1, False), "biggan/1_fake": (1, True)}, seed=5)
    cases = {
        "not json": ("{rows: [", "is not valid JSON"),
        "no rows": (json.dumps({"description": "x"}), 'has no "rows" list'),
        "typo in a row": (json.dumps({"rows": [{"name": "biggan", "folders": "biggan"}]}), "unknown key 'folders'"),
        "no folders": (json.dumps({"rows": [{"name": "biggan"}]}), 'give its images as "folder"'),
        "twice": (json.dumps({"rows": [{"name": "b", "folder": "biggan"}, {"name": "b", "folder": "biggan"}]}), "used twice"),
        "wrong class": (json.dumps({"rows": [{"name": "b", "fake": "biggan", "real": "biggan/0_real"}]}), "is in a real folder"),
        "nothing there": (json.dumps({"rows": [{"name": "x", "folder": "stylegan"}]}), "None of the folders named by"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        path.write_text(text)
        with pytest.raises(rps.UserError, match=re.escape(message)):
            rps.collect_test_items(tmp_path / "test", protocol=path)
    with pytest.raises(rps.UserError, match="--real-dir has no use with"):
        rps.collect_test_items(tmp_path / "test", real_dir=tmp_path, protocol=RINE20)
    with pytest.raises(rps.UserError, match="No protocol file"):
        rps.collect_test_items(tmp_path / "test", protocol=tmp_path / "missing.json")
    # Through the command line: one line, exit code 1, no traceback.
    result = run_main(["eval", "--ckpt", trained, "--data", "test", "--protocol", "not_json.json"], cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "is not valid JSON" in result.stderr


def test_a_missing_real_folder_is_named_and_its_rows_keep_their_fakes(tmp_path, capsys):
    write_images(tmp_path / "test", {"diffusion_datasets/ldm_200/1_fake": (2, True), "biggan/0_real": (1, False),
                                     "biggan/1_fake": (1, True)}, seed=9)
    items = rps.collect_test_items(tmp_path / "test", protocol=RINE20)
    assert list(dict.fromkeys(row for _, _, row in items)) == ["biggan", "diffusion_datasets/ldm_200"]
    assert not [item for item in items if item[2] == "diffusion_datasets/ldm_200" and item[1] == 0]
    err = capsys.readouterr().err
    laion = tmp_path / "test" / "diffusion_datasets" / "laion"
    assert f"warning: no folder {laion}, named by {RINE20} for diffusion_datasets/ldm_200\n" in err, err


def test_synthbuster_real_dir_option_replaces_the_protocols_raise_folder(model, tmp_path):
    written = write_images(tmp_path, {"sb/dalle2": (2, True), "elsewhere/RAISE": (3, False)}, seed=6)
    items = rps.collect_test_items(tmp_path / "sb", real_dir=tmp_path / "elsewhere/RAISE", protocol=SYNTHBUSTER)
    assert sorted(p for p, label, row in items if label == 0) == written["elsewhere/RAISE"]
    assert {row for _, _, row in items} == {"dalle2"}


# --------------------------------------------------------------------------- 5. the resize sweep

def test_resize_sweep_matches_pil_resizing(trained, model, tmp_path):
    spec = {"stylegan/0_real": (3, False), "stylegan/1_fake": (3, True), "crn/0_real": (2, False), "crn/1_fake": (3, True)}
    written = write_images(tmp_path / "test", spec, seed=8)
    result = run_script(["eval", "--ckpt", trained, "--data", "test", "--resize", "0.5,1.5", "--out", "out",
                         "--device", "cpu", "--num-workers", "0"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_csv(tmp_path / "out" / "eval_test_resize0.5-1.5.csv")
    assert list(dict.fromkeys(row["condition"] for row in rows)) == ["clean", "resize factor 0.5", "resize factor 1.5"]
    paths = [p for folder in spec for p in written[folder]]
    for factor in (0.5, 1.5):
        # Resized in the test: bicubic PIL resampling (antialiased when shrinking), before the centre crop.
        resized = []
        for path in paths:
            with Image.open(path) as image:
                image = image.convert("RGB")
                resized.append(image.resize((round(image.width * factor), round(image.height * factor)), Image.BICUBIC))
        score_of = dict(zip(paths, rps.predict(model, resized).tolist()))
        clean = dict(zip(paths, rps.predict(model, paths).tolist()))
        assert max(abs(score_of[p] - clean[p]) for p in paths) > 1e-4  # the resize reaches the model
        block = {row["generator"]: row for row in rows if row["condition"] == f"resize factor {factor}"}
        assert list(block) == ["crn", "stylegan", "mean (2 generators)"]
        for generator in ("crn", "stylegan"):
            want = expected_row(written[f"{generator}/0_real"], written[f"{generator}/1_fake"], score_of)
            assert_row_matches(block[generator], want, ROUNDED, (factor, generator))
    plot = tmp_path / "out" / "eval_test_resize0.5-1.5_robustness_resize.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    image = Image.open(written["crn/1_fake"][0]).convert("RGB")
    assert np.array_equal(np.asarray(rps.FixedPerturbation(resize=0.75)(image)),
                          np.asarray(image.resize((round(image.width * 0.75), round(image.height * 0.75)), Image.BICUBIC)))
    assert rps.FixedPerturbation(resize=0.5)(image).size == (image.width // 2, image.height // 2)
    bad = run_main(["eval", "--ckpt", trained, "--data", "test", "--resize", "0"], cwd=tmp_path)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "--resize" in bad.stderr


# --------------------------------------------------------------------------- 6. split folders, row naming, GenImage

def test_a_tree_with_training_splits_is_refused_so_train_images_never_enter_a_test_row(tmp_path, trained):
    """GenImage's root holds <gen>/<set>/train beside <gen>/<set>/val: without the refusal both merged into one row."""
    write_images(tmp_path / "GenImage", {"sdv/imagenet_sdv/train/ai": (2, True), "sdv/imagenet_sdv/train/nature": (2, False),
                                         "sdv/imagenet_sdv/val/ai": (1, True), "sdv/imagenet_sdv/val/nature": (1, False)}, seed=11)
    split = tmp_path / "GenImage" / "sdv" / "imagenet_sdv" / "train"
    with pytest.raises(rps.UserError, match=re.escape(f"{split} is a training split")):
        rps.collect_test_items(tmp_path / "GenImage")
    result = run_main(["eval", "--ckpt", trained, "--data", "GenImage", "--device", "cpu"], cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "protocols/genimage.json" in result.stderr
    # The val folder alone is one row named after the generator; ForenSynths' category `train` (the vehicle),
    # beside other categories, is a category like any other.
    items = rps.collect_test_items(tmp_path / "GenImage" / "sdv" / "imagenet_sdv" / "val")
    assert len(items) == 2
    write_images(tmp_path / "test", {f"progan/{c}/{label}": (1, label == "1_fake") for c in ("car", "train")
                                     for label in ("0_real", "1_fake")}, seed=12)
    assert {row for _, _, row in rps.collect_test_items(tmp_path / "test")} == {"progan"}


def test_a_category_missing_a_class_keeps_its_generator_one_row():
    groups = {"progan/car": {0, 1}, "progan/cat": {0, 1}, "progan/dog": {1}, "biggan": {0, 1}}
    assert rps.generator_row_names(groups, "test") == {group: group.split("/")[0] for group in groups}


def test_a_generator_with_both_classes_beside_a_fake_only_one_is_not_merged():
    """`gans/` collects generators: biggan with both classes, stargan with fakes only (its reals elsewhere)."""
    groups = {"gans/biggan": {0, 1}, "gans/stargan": {1}}
    assert rps.generator_row_names(groups, "test") == {"gans/biggan": "gans/biggan", "gans/stargan": "gans/stargan"}
    # Several one-class folders of both kinds are UniversalFakeDetect's layout, even beside two-class ones.
    groups = {"dd/guided": {1}, "dd/ldm": {1}, "dd/laion": {0}, "dd/mine": {0, 1}, "dd/yours": {0, 1}}
    assert rps.generator_row_names(groups, "test") == {group: group for group in groups}


def test_genimage_protocol_scores_each_generators_val_split_only(trained, tmp_path):
    protocol = protocols.read_protocol(GENIMAGE)
    assert [(row["name"], row["folder"]) for row in protocol["rows"]] == [
        (name, f"{folder}/val") for name, folder in GENIMAGE_FOLDERS.items()]
    spec = {f"{GENIMAGE_FOLDERS[name]}/{split}/{label}": (1 + (split == "train"), label == "ai")
            for name in ("SD V1.4", "BigGAN") for split in ("train", "val") for label in ("ai", "nature")}
    written = write_images(tmp_path / "GenImage", spec, seed=13)
    items = rps.collect_test_items(tmp_path / "GenImage", protocol=GENIMAGE)
    want = sorted(p for folder, paths in written.items() if "/val/" in folder for p in paths)
    assert sorted(str(p) for p, _, _ in items) == want  # no training image
    result = run_script(["eval", "--ckpt", trained, "--data", "GenImage", "--protocol", GENIMAGE, "--out", "out",
                         "--device", "cpu", "--num-workers", "0"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_csv(tmp_path / "out" / "eval_GenImage_genimage.csv")
    assert [(row["generator"], row["n_real"], row["n_fake"]) for row in rows] == [
        ("SD V1.4", "1", "1"), ("BigGAN", "1", "1"), ("mean (2 generators)", "2", "2")]
    assert "6 of the 8 rows" in result.stderr


def test_a_row_whose_count_differs_from_the_protocols_gets_one_note(trained, tmp_path):
    write_images(tmp_path / "test", {"biggan/0_real": (2, False), "biggan/1_fake": (2, True), "crn/0_real": (1, False),
                                     "crn/1_fake": (2, True)}, seed=14)
    protocol = {"rows": [{"name": "biggan", "folder": "biggan", "expected": {"real": 2, "fake": 2}},
                         {"name": "crn", "folder": "crn", "expected": {"real": 2, "fake": 2}}]}
    (tmp_path / "counted.json").write_text(json.dumps(protocol))
    result = run_script(["eval", "--ckpt", trained, "--data", "test", "--protocol", "counted.json", "--out", "out",
                         "--device", "cpu", "--num-workers", "0"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ") and "benchmark has" in line]
    assert notes == ["note: crn has 1 real and 2 fake images where the benchmark has 2 real and 2 fake."]
    protocol["rows"][1]["expected"] = {"real": 1, "fake": 2}
    assert protocols.expected_count_notes(protocol, rps.collect_test_items(tmp_path / "test", protocol=tmp_path / "counted.json")) == []
    for bad in ({"real": -1}, {"reals": 2}, {"real": 1.5}, {}, [2, 2]):
        (tmp_path / "bad.json").write_text(json.dumps({"rows": [{"name": "crn", "folder": "crn", "expected": bad}]}))
        with pytest.raises(rps.UserError, match='"expected" is the row'):
            protocols.read_protocol(tmp_path / "bad.json")
