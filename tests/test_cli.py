"""The command line as a user meets it: --help, mistakes, import without side effects, the demo, eval."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rine_plus_ssca as rps
from conftest import REPO, nonempty_lines, run_copied_script, run_script, write_demo_tree


# --------------------------------------------------------------------------- --help

@pytest.fixture(scope="module")
def help_entries(help_texts):
    """{option string: help text} parsed from `--help` (COLUMNS huge so nothing wraps; conftest's help_texts)."""
    entries, current = {}, None
    for line in help_texts["train"].split("options:", 1)[1].splitlines():
        match = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if match:
            current = [o.split(" ")[0] for o in match.group(1).split(", ")]
            for option in current:
                entries[option] = (match.group(2) or "").strip()
        elif current and line.strip():
            for option in current:
                entries[option] = (entries[option] + " " + line.strip()).strip()
    return entries


def test_help_lists_every_constant_with_its_default(help_entries):
    defaults = rps.default_config()
    for name in rps.CONFIG_NAMES:
        option = "--" + name.lower().replace("_", "-")
        assert option in help_entries, f"{name}: {option} missing from --help"
        default = getattr(defaults, name)
        text = help_entries[option]
        assert f"(default: {default!r})" in text or f"(default: {default})" in text, f"{option}: {text}"
        if isinstance(default, bool):  # booleans come as a pair: --use-tie / --no-use-tie
            assert "--no-" + option[2:] in help_entries, option


def test_every_option_is_a_documented_public_constant(help_entries):
    # CONFIG_NAMES must be exactly the constants block: public UPPERCASE names with a plain default
    # (they go into checkpoints) and a comment that becomes their --help text.
    for name in rps.CONFIG_NAMES:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f"{name!r} is not a configuration constant"
        assert type(getattr(rps.default_config(), name)) in (bool, int, float, str), name
        option = "--" + name.lower().replace("_", "-")
        described = re.sub(r"\(default: .*\)$", "", help_entries.get(option, "")).strip()
        assert described, f"{option} has no help text"
    listed = {o for o in help_entries if o.startswith("--") and not o.startswith("--no-")}
    extra = listed - {"--" + n.lower().replace("_", "-") for n in rps.CONFIG_NAMES} - {"--help", "--demo", "--debug", "--seeds"}
    assert not extra, f"options that are no constant: {extra}"


# --------------------------------------------------------------------------- mistakes

def test_mistyped_option_exits_2_with_one_line_and_a_suggestion(tmp_path):
    result = run_script(["--bach-size", "3"], cwd=tmp_path)
    assert result.returncode == 2
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "--bach-size" in lines[0] and "--batch-size" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("argv,suggestion", [
    (["--batch", "3"], "--batch-size"),  # prefixes are refused too (allow_abbrev=False)
    (["--learning-rate", "0.1"], None),
    (["--fusion", "sum"], None),  # not one of the choices
    (["--batch-size", "many"], None),  # wrong type
    (["--use-tie=yes"], None),
    (["eval", "--ckpt", "x.pth", "--data", "d", "--bogus"], None),
])
def test_bad_options_exit_2_with_one_line(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rps.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = nonempty_lines(captured.err)
    assert len(lines) == 1, captured.err
    if suggestion:
        assert suggestion in lines[0]


def test_eval_with_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "test").mkdir()
    code = rps.main(["eval", "--ckpt", str(tmp_path / "missing.pth"), "--data", str(tmp_path / "test"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code not in (0, 2)
    lines = nonempty_lines(captured.err)
    assert len(lines) == 1 and "missing.pth" in lines[0], captured.err


# --------------------------------------------------------------------------- import

def test_import_has_no_side_effects(tmp_path):
    # A fresh interpreter, a fresh HOME (where HuggingFace would cache a download) and an empty cwd.
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = dict(os.environ, HOME=str(home), HF_HOME=str(home / "hf"), PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
    code = "import rine_plus_ssca as m; print('imported', callable(m.main), callable(m.train))"
    result = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported True True"  # nothing else printed: no training started
    assert list(work.iterdir()) == [] and list(home.iterdir()) == []  # no files, no caches, no downloads


# --------------------------------------------------------------------------- training through the CLI

def test_options_reach_the_saved_configuration(tmp_path, tiny_backbone):
    write_demo_tree(tmp_path / "data", {"train": {"nearest": 8, "bilinear": 8}}, seed=2)  # no val/: hold-out
    options = {"--proj-dim": "16", "--spec-channels": "8", "--fusion-dim": "16", "--fusion-heads": "2",
               "--fusion": "concat", "--epochs": "1", "--batch-size": "6", "--xi": "0.4", "--lr": "0.002",
               "--val-fraction": "0.25", "--seed": "3", "--blocks": "0,2", "--select-metric": "acc",
               "--clip-model": tiny_backbone, "--device": "cpu", "--num-workers": "0", "--checkpoint-dir": "out"}
    args = [x for pair in options.items() for x in pair] + ["--no-use-tie"]
    result = run_script(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "out" / rps.BEST_NAME, weights_only=True)
    config = rps.checkpoint_config(checkpoint)
    expected = dict(PROJ_DIM=16, SPEC_CHANNELS=8, FUSION_DIM=16, FUSION_HEADS=2, FUSION="concat", EPOCHS=1,
                    BATCH_SIZE=6, XI=0.4, LR=0.002, VAL_FRACTION=0.25, SEED=3, BLOCKS="0,2", SELECT_METRIC="acc",
                    USE_TIE=False, DATA_DIR="data", CHECKPOINT_DIR="out")
    for name, value in expected.items():
        assert config[name] == value and type(config[name]) is type(value), (name, config[name])
    assert "alpha" not in checkpoint["model"]  # --no-use-tie built the ablation
    assert checkpoint["model"]["proj1.1.weight"].shape[0] == 16
    # No val/ folder: a 25% hold-out of each (generator, class) stratum of 8 images is the validation set.
    assert checkpoint["metrics"]["n_real"] + checkpoint["metrics"]["n_fake"] == 4 * round(0.25 * 8)


# --------------------------------------------------------------------------- the demo and eval

def parse_table(text, first_column):
    """Rows (lists of cells) of the last plain-text table whose header starts with first_column."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.split()[:1] == [first_column]
              and i + 1 < len(lines) and set(lines[i + 1].replace(" ", "")) == {"-"}]
    assert starts, f"no table starting with {first_column!r} in:\n{text[-3000:]}"
    header = lines[starts[-1]].split()
    rows = []
    for line in lines[starts[-1] + 2:]:
        if not line.strip():
            break
        rows.append(dict(zip(header, re.split(r"\s{2,}", line.strip()))))  # cells are two spaces apart
    return rows


def test_demo_runs_end_to_end(demo):
    cwd, result = demo
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    best = cwd / "checkpoints/demo" / rps.BEST_NAME
    assert best.is_file()
    # Where the tiny backbone is, for --clip-model when the checkpoint is used elsewhere offline.
    backbone = (cwd / "checkpoints/demo/tiny_clip_backbone").resolve()
    assert f"its backbone (give it to --clip-model where the checkpoint cannot find it): {backbone}\n" in result.stdout
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    # The validation table: one row per epoch, with accuracy and AP.
    rows = parse_table(result.stdout, "epoch")
    assert [int(r["epoch"]) for r in rows] == list(range(1, checkpoint["run_config"]["EPOCHS"] + 1))
    assert {"acc", "ap"} <= set(rows[0])
    assert checkpoint["metrics"]["acc"] >= 0.90, checkpoint["metrics"]
    best_row = [r for r in rows if int(r["epoch"]) == checkpoint["epoch"]][0]
    assert float(best_row["acc"]) == pytest.approx(checkpoint["metrics"]["acc"], abs=1e-4)


def relabelled_copy(source, target, real_name, fake_name):
    """The same images under other label-folder names."""
    shutil.copytree(source, target)
    for folder in sorted(Path(target).rglob("*"), key=lambda p: -len(p.parts)):
        if folder.is_dir() and folder.name in ("0_real", "1_fake"):
            folder.rename(folder.with_name(real_name if folder.name == "0_real" else fake_name))
    return target


def rows_by_generator(rows):
    return {row[0]: row[1:] for row in rows}


def test_eval_command_and_layouts_agree(demo, tmp_path):
    cwd, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = Path("checkpoints/demo") / rps.BEST_NAME
    test_dir = cwd / "data/demo/test"
    generators = sorted(p.name for p in test_dir.iterdir() if p.is_dir())

    evaluated = run_script(["eval", "--ckpt", ckpt, "--data", "data/demo/test", "--num-workers", "0"], cwd=cwd)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    printed = {row["generator"]: row for row in parse_table(evaluated.stdout, "generator")}
    assert sorted(printed) == sorted(generators + [f"mean ({len(generators)} generators)"])

    # In this process (another cwd, as a notebook would): the backbone folder is found beside the checkpoint.
    model = rps.load_detector(cwd / ckpt, device="cpu")
    reference, _, labels, _, _ = rps.evaluate_folder(model, test_dir, batch_size=32, num_workers=0)
    columns = ["generator"] + rps.METRIC_COLUMNS
    for row in reference:
        for column, value in zip(columns[1:], row[1:]):
            shown = printed[row[0]][column]
            assert (shown == "nan" and np.isnan(value)) or float(shown) == pytest.approx(value, abs=1e-4), (row[0], column)
    assert len(labels) == sum(len(list(test_dir.glob(f"{g}/*/*.png"))) for g in generators)

    # The same images under real|fake, nature|ai and mixed-case names give the same per-generator table.
    expected = rows_by_generator(reference)
    for real_name, fake_name in (("real", "fake"), ("nature", "ai"), ("Real", "FAKE")):
        copy = relabelled_copy(test_dir, tmp_path / f"{real_name}_{fake_name}", real_name, fake_name)
        got = rows_by_generator(rps.evaluate_folder(model, copy, batch_size=32, num_workers=0)[0])
        assert got.keys() == expected.keys(), (real_name, fake_name)
        for generator, values in expected.items():
            np.testing.assert_allclose(np.array(got[generator], dtype=float), np.array(values, dtype=float),
                                       atol=1e-6, err_msg=f"{real_name}/{fake_name}: {generator}")


def test_the_script_alone_in_an_empty_folder_trains_evaluates_and_predicts(demo):
    # The demo fixture ran a copy of rine_plus_ssca.py alone in its folder (training and the test table);
    # the same copy then evaluates and predicts with the checkpoint it wrote, offline.
    cwd, result = demo
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in cwd.iterdir()) == ["checkpoints", "data", "rine_plus_ssca.py"]
    # Training's pictures are the package's: one note says the run is saved without them.
    notes = [line for line in result.stdout.splitlines() if "pictures needs the folder rine_plus_ssca_tools/" in line]
    assert len(notes) == 1 and notes[0].startswith("note: Drawing training's pictures needs the folder"), notes
    assert notes[0].endswith("The run is saved without them.")
    assert not any((cwd / "checkpoints/demo" / name).exists() for name in ("training_curves.png", "tie_block_importance.png"))
    ckpt = Path("checkpoints/demo") / rps.BEST_NAME
    evaluated = run_copied_script(["eval", "--ckpt", ckpt, "--data", "data/demo/test", "--num-workers", "0",
                                   "--out", "alone_eval"], cwd=cwd)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert re.search(r"^mean \(3 generators\)", evaluated.stdout, re.M), evaluated.stdout[-3000:]
    predicted = run_copied_script(["predict", "--ckpt", ckpt, "data/demo/test/bilinear", "--num-workers", "0"], cwd=cwd)
    assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-3000:]
    n_images = len(list((cwd / "data/demo/test/bilinear").rglob("*.png")))
    assert len(re.findall(r"^\s*\d\.\d{4}\s+(real|fake)\s", predicted.stdout, re.M)) == n_images, predicted.stdout[-3000:]

