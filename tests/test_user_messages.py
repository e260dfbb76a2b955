"""What a new user runs into: loading a detector from anywhere, exported weights, and one-line messages.

Each test reproduces one step that went wrong for a first-time user (a notebook outside the
project folder, `predict` on the exported file, a mistyped command, ...). Most call
rps.main() in-process (fast); the notebook-style load runs in a subprocess with another cwd.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rine_plus_ssca as rps
from conftest import REPO, small_config, write_demo_tree

LAYOUT = {"train": {"nearest": 4, "bilinear": 4}, "val": {"nearest": 2, "bilinear": 2}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone):
    """One epoch trained the way the README says: from the project folder, with relative paths
    (backbone in backbones/tiny, checkpoints in checkpoints/)."""
    root = tmp_path_factory.mktemp("project")
    write_demo_tree(root / "data", LAYOUT, seed=2)
    shutil.copytree(tiny_backbone, root / "backbones/tiny")
    cfg = small_config("backbones/tiny", DATA_DIR="data", CHECKPOINT_DIR="checkpoints", EPOCHS=1)
    before = os.getcwd()
    os.chdir(root)
    try:
        best = root / rps.train(cfg)
    finally:
        os.chdir(before)
    image = str(next((root / "data/val/nearest/1_fake").glob("*.png")))
    return dict(root=root, best=best, image=image)


def main(argv, capsys):
    """rps.main(argv) -> (exit code, stdout, stderr); argparse's own exits count too."""
    try:
        code = rps.main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (1, 2) and len(lines) == 1 and "Traceback" not in err, (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- 1. load from any folder

def test_a_notebook_in_another_folder_loads_the_checkpoint(trained, tmp_path):
    # The checkpoint names its backbone "backbones/tiny", relative to the training run's folder.
    assert torch.load(trained["best"], weights_only=True)["architecture"]["CLIP_MODEL"] == "backbones/tiny"
    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from rine_plus_ssca import load_detector, predict; "
            "print(float(predict(load_detector(sys.argv[2], device='cpu'), [sys.argv[3]])[0]))")
    result = subprocess.run([sys.executable, "-c", code, str(REPO), str(trained["best"]), trained["image"]],
                            cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    model = rps.load_detector(trained["best"], clip_model=str(trained["root"] / "backbones/tiny"), device="cpu")
    expected = float(rps.predict(model, [trained["image"]])[0])
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-5)


def test_a_backbone_folder_that_moved_gets_a_message_naming_clip_model(trained, tmp_path, monkeypatch):
    checkpoint = torch.load(trained["best"], weights_only=True)
    checkpoint["backbone_folder"] = str(tmp_path / "moved_away")
    rps.atomic_torch_save(checkpoint, tmp_path / "ck/best.pth")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(rps.UserError, match="backbones/tiny") as error:
        rps.load_detector(tmp_path / "ck/best.pth", device="cpu")
    assert "clip_model=" in str(error.value) and "--clip-model" in str(error.value)


# --------------------------------------------------------------------------- 2. export is a checkpoint

def test_exported_file_is_readable_by_others_and_predicts_like_the_checkpoint(trained, tmp_path, capsys):
    out = tmp_path / "share/detector.safetensors"
    code, _, err = main(["export", "--ckpt", trained["best"], "--out", out], capsys)
    assert code == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # 0644 under the usual umask, like any other file
    scores = {}
    for ckpt in (trained["best"], out):
        code, stdout, err = main(["predict", "--ckpt", ckpt, trained["image"], "--num-workers", 0, "--device", "cpu",
                                  "--clip-model", trained["root"] / "backbones/tiny"], capsys)
        assert code == 0, err
        scores[ckpt] = float(stdout.splitlines()[1].split()[0])
    assert scores[out] == scores[trained["best"]]
    model = rps.load_detector(out, clip_model=str(trained["root"] / "backbones/tiny"), device="cpu")
    assert model.config["PROJ_DIM"] == 32 and not model.training


# --------------------------------------------------------------------------- 3. a folder name that looks like an id

def test_missing_folder_that_looks_like_a_hub_id_says_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # HF_HUB_OFFLINE=1 (conftest): the Hub part fails at once
    with pytest.raises(rps.UserError) as error:
        rps.load_clip_vision("models/clip-vit-large-patch14")
    message = str(error.value)
    assert "No backbone folder models/clip-vit-large-patch14" in message and str(tmp_path) in message
    assert "HuggingFace id" in message and "HF_HUB_OFFLINE" in message and "--clip-model" in message


def test_a_hub_id_in_the_local_cache_still_loads(tmp_path, tiny_backbone):
    # openai/clip-vit-large-patch14 as huggingface_hub caches it after a first download (the tiny model
    # stands in for it): the id must load offline, from the cache.
    repo = tmp_path / "hub/models--openai--clip-vit-large-patch14"
    commit = "0" * 40
    shutil.copytree(tiny_backbone, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(commit)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import rine_plus_ssca as r; "
            "print(r.load_clip_vision('openai/clip-vit-large-patch14').config.hidden_size)")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"))
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "64"


# --------------------------------------------------------------------------- 5. numbers of the commands

@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("option,value", [("--batch-size", 0), ("--num-workers", -1), ("--threshold", 2),
                                          ("--threshold", "nan")])
def test_impossible_numbers_are_one_line_errors(command, option, value, tmp_path, capsys):
    target = ["--data", tmp_path] if command == "eval" else [tmp_path / "image.png"]
    (tmp_path / "image.png").write_bytes(b"")
    code, _, err = main([command, "--ckpt", tmp_path / "none.pth", *target, option, value], capsys)
    one_line_error(code, err, option)


def test_eval_only_numbers_are_checked(tmp_path, capsys):
    for option, value in [("--max-per-class", 0), ("--target-fpr", 1.5), ("--jpeg-quality", "95,0"),
                          ("--blur-sigma", "-1")]:
        code, _, err = main(["eval", "--ckpt", tmp_path / "none.pth", "--data", tmp_path, option, value], capsys)
        one_line_error(code, err, option)


def test_explain_into_a_file_is_a_one_line_error_before_any_work(trained, tmp_path, capsys):
    (tmp_path / "heatmaps.png").write_bytes(b"not a folder")
    code, out, err = main(["predict", "--ckpt", trained["best"], trained["image"], "--explain", tmp_path / "heatmaps.png",
                           "--device", "cpu", "--num-workers", "0"], capsys)
    one_line_error(code, err, "--explain takes a folder", "heatmaps.png")
    assert "P(fake)" not in out  # refused before scoring anything


# --------------------------------------------------------------------------- 6. --resume with nothing there

def test_resume_without_a_last_checkpoint_names_training_options(tmp_path, tiny_backbone, capsys):
    write_demo_tree(tmp_path / "data", {"train": {"nearest": 2}, "val": {"nearest": 1}}, seed=3)
    code, _, err = main(["--data-dir", tmp_path / "data", "--clip-model", tiny_backbone, "--checkpoint-dir",
                         tmp_path / "ck", "--resume", "--device", "cpu", "--num-workers", 0, "--batch-size", 2], capsys)
    line = one_line_error(code, err, "Nothing to resume", "--resume", "--checkpoint-dir")
    assert "--ckpt" not in line  # training has no such option


# --------------------------------------------------------------------------- 7. TRAIN_CLASSES

@pytest.mark.parametrize("classes,unknown", [("nearest,horse", "horse"), ("Nearest", "Nearest")])
def test_train_classes_that_match_no_folder_are_refused_with_the_folders_there(classes, unknown, tmp_path, make_cfg):
    write_demo_tree(tmp_path / "data", {"train": {"nearest": 2, "bilinear": 2}}, seed=4)
    with pytest.raises(rps.UserError) as error:
        rps.prepare_splits(make_cfg(DATA_DIR=str(tmp_path / "data"), TRAIN_CLASSES=classes))
    message = str(error.value)
    assert unknown in message and "bilinear, nearest" in message and "case-sensitive" in message


# --------------------------------------------------------------------------- 9. a mistyped command

def test_a_mistyped_command_gets_a_suggestion(capsys):
    code, out, err = main(["evaluate", "--ckpt", "x.pth", "--data", "test"], capsys)
    assert code == 2 and out == ""
    one_line_error(code, err, "'evaluate'", "did you mean eval?")


# --------------------------------------------------------------------------- 10. rough edges

def test_check_data_with_no_labelled_image_fails_and_counts_in_the_singular(tmp_path, capsys):
    write_demo_tree(tmp_path / "photos", {"holiday": {"all": 1}}, label_folders=("a", "b"), seed=5)
    files = list((tmp_path / "photos").rglob("*.png"))
    files[1].unlink()
    code, out, err = main(["check-data", "--data", tmp_path / "photos", "--workers", 1], capsys)
    assert code == 1
    assert "checking 1 image file under" in out
    assert "no labelled images" in err


def test_ckpt_naming_a_folder_lists_the_checkpoints_in_it(trained):
    folder = trained["best"].parent
    with pytest.raises(rps.UserError) as error:
        rps.read_checkpoint(folder)
    message = str(error.value)
    assert "is a folder" in message and str(folder / rps.BEST_NAME) in message and str(folder / rps.LAST_NAME) in message


@pytest.mark.parametrize("batch_size,expected", [(1, "SupCon"), (64, "larger than the 8 training images")])
def test_batch_sizes_that_defeat_training_are_warned_about(batch_size, expected, tmp_path, make_cfg, capsys):
    write_demo_tree(tmp_path / "data", {"train": {"nearest": 2, "bilinear": 2}, "val": {"nearest": 1}}, seed=6)
    rps.prepare_splits(make_cfg(DATA_DIR=str(tmp_path / "data"), BATCH_SIZE=batch_size))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and expected in warnings[0], warnings


def test_a_usual_batch_size_gives_no_warning(tmp_path, make_cfg, capsys):
    write_demo_tree(tmp_path / "data", {"train": {"nearest": 2, "bilinear": 2}, "val": {"nearest": 1}}, seed=6)
    rps.prepare_splits(make_cfg(DATA_DIR=str(tmp_path / "data"), BATCH_SIZE=4))
    assert "warning:" not in capsys.readouterr().out


# --------------------------------------------------------------------------- 11. what a newcomer is told next

def test_check_data_ends_by_saying_why_it_exits_1_on_unreadable_images(tmp_path, capsys):
    write_demo_tree(tmp_path / "data", {"train": {"nearest": 2}}, seed=5)
    broken = tmp_path / "data/train/nearest/1_fake/broken.png"
    broken.write_bytes(b"<html>not an image</html>")
    code, out, err = main(["check-data", "--data", tmp_path / "data", "--workers", 1], capsys)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: 1 image under ") and "cannot be read" in last and "delete or re-download" in last


def test_eval_on_a_folder_without_labels_points_to_predict(tmp_path):
    write_demo_tree(tmp_path / "photos", {"holiday": {"all": 1}}, label_folders=("a", "b"), seed=5)
    with pytest.raises(rps.UserError) as error:
        rps.collect_test_items(tmp_path / "photos")
    assert "use predict: python rine_plus_ssca.py predict --ckpt CHECKPOINT " + str(tmp_path / "photos") in str(error.value)


def test_errors_met_in_python_name_the_python_way_too(tmp_path):
    # load_detector's user never typed --ckpt: the message must say what to change in the call as well.
    with pytest.raises(rps.UserError) as error:
        rps.load_detector(tmp_path / "no_such.pth", device="cpu")
    assert "load_detector(FILE)" in str(error.value) and "--ckpt" in str(error.value)
    with pytest.raises(rps.UserError) as error:
        rps.load_detector(tmp_path, device="cpu")
    assert "load_detector(FILE)" in str(error.value)
    with pytest.raises(rps.UserError) as error:
        rps.check_backbone_matches({"hidden_size": 1024, "num_hidden_layers": 24}, {"hidden_size": 64, "num_hidden_layers": 4},
                                   "rine.pth", "tiny")
    assert "clip_model=" in str(error.value) and "--clip-model" in str(error.value)
