"""A tiny real training run: checkpoint contents, safe loading, and a notebook-style round trip."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rine_plus_ssca as rps
from conftest import REPO, TRAINED_EPOCHS

@pytest.fixture(scope="module")
def run(trained_checkpoint):
    """The test run's shared checkpoint: 2 epochs on a small generated tree (absolute paths, all in tmp)."""
    return trained_checkpoint


def is_plain(value):
    """Only what torch.load(weights_only=True) accepts without custom classes."""
    if isinstance(value, dict):
        return all(type(k) in (str, int) and is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    return value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor)


def test_best_and_last_checkpoints_are_written_atomically(run):
    ckpt_dir = run["best"].parent
    assert run["best"].name == rps.BEST_NAME and run["best"].is_file() and run["last"].is_file()
    assert not [p.name for p in ckpt_dir.iterdir() if ".tmp" in p.name]  # no half-written leftovers


@pytest.mark.parametrize("which", ["best", "last"])
def test_checkpoint_loads_with_weights_only_and_holds_no_backbone(run, which):
    checkpoint = torch.load(run[which], map_location="cpu", weights_only=True)
    assert {"architecture", "run_config", "model", "metrics"} <= set(checkpoint)
    not_plain = [key for key, value in checkpoint.items() if not is_plain(value)]
    assert not not_plain, f"entries that are not tensors/plain values: {not_plain}"
    keys = list(checkpoint["model"])
    assert keys and not [k for k in keys if k.startswith("backbone.") or ".clip." in k or "encoder.layers" in k]
    assert all(isinstance(v, torch.Tensor) for v in checkpoint["model"].values())
    for metric in ("acc", "ap", "auc"):
        assert isinstance(checkpoint["metrics"][metric], float)
        assert 0.0 <= checkpoint["metrics"][metric] <= 1.0
    # The whole configuration, so a notebook can rebuild the model.
    config = rps.checkpoint_config(checkpoint)
    missing = [name for name in rps.CONFIG_NAMES if name not in config]
    assert not missing, f"configuration constants missing from the checkpoint: {missing}"
    for name in rps.CONFIG_NAMES:
        assert config[name] == getattr(run["cfg"], name), name
    # The architecture apart from the run's settings.
    assert list(checkpoint["architecture"]) == rps.ARCHITECTURE_CONSTANTS
    assert not set(checkpoint["run_config"]) & set(rps.ARCHITECTURE_CONSTANTS)


def test_last_checkpoint_has_the_whole_history_and_best_follows_the_select_metric(run):
    last = torch.load(run["last"], weights_only=True)
    best = torch.load(run["best"], weights_only=True)
    history = last["history"]
    assert [m["epoch"] for m in history] == list(range(1, TRAINED_EPOCHS + 1))
    # SELECT_METRIC="ap" (the default): highest AP, ties to the lower validation loss, first wins.
    chosen = history[0]
    for metrics in history[1:]:
        if metrics["ap"] > chosen["ap"] or (metrics["ap"] == chosen["ap"] and metrics["val_bce"] < chosen["val_bce"]):
            chosen = metrics
    assert run["cfg"].SELECT_METRIC == "ap"
    assert best["epoch"] == chosen["epoch"]
    assert best["metrics"]["ap"] == chosen["ap"]


def reference_probabilities(checkpoint_path, paths):
    """P(fake) computed here without load_detector/predict: rebuild, load weights, crop, normalise, then
    sigmoid(logit / T) with the temperature the checkpoint stores (its calibration)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    cfg = rps.default_config()
    for name, value in checkpoint["architecture"].items():
        setattr(cfg, name, value)
    model = rps.RINEPlusSSCA(cfg)
    missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    assert not unexpected and all(k.startswith("backbone.") for k in missing)
    model.eval()
    mean, std = np.array(rps.CLIP_MEAN), np.array(rps.CLIP_STD)
    batch = []
    for path in paths:
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
        top, left = (array.shape[0] - 224) // 2, (array.shape[1] - 224) // 2  # centre crop, no resize
        batch.append(((array[top:top + 224, left:left + 224] - mean) / std).transpose(2, 0, 1))
    with torch.no_grad():
        logits, _ = model(torch.tensor(np.stack(batch), dtype=torch.float32))
    return torch.sigmoid(logits.double() / checkpoint["calibration"]["temperature"]).numpy()


def test_round_trip_in_a_fresh_process_matches(run, tmp_path):
    paths = run["test_images"]
    expected = reference_probabilities(run["best"], paths)
    assert expected.std() > 1e-4  # the model tells images apart, so the comparison means something

    # A notebook: a fresh interpreter that only imports load_detector and predict.
    out = tmp_path / "probs.npy"
    code = ("import json, sys, numpy as np\n"
            "from rine_plus_ssca import load_detector, predict\n"
            "model = load_detector(sys.argv[1], device='cpu')\n"
            "assert not model.training\n"
            "np.save(sys.argv[2], predict(model, json.loads(sys.argv[3])))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-c", code, str(run["best"]), str(out), json.dumps(paths)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-4, atol=1e-5)

    # The same in this process, and with PIL images instead of paths.
    model = rps.load_detector(run["best"], device="cpu")
    assert not model.training
    in_process = rps.predict(model, paths)
    assert in_process.shape == (len(paths),)
    np.testing.assert_allclose(in_process, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rps.predict(model, [Image.open(p) for p in paths[:3]]), expected[:3], rtol=1e-4, atol=1e-5)
    assert rps.predict(model, paths[0]).shape == (1,)


def test_evaluate_folder_scores_match_predict(run):
    model = rps.load_detector(run["best"], device="cpu")
    rows, items, labels, probs, _ = rps.evaluate_folder(model, run["root"] / "data/test", batch_size=5, num_workers=0)
    assert len(items) == len(run["test_images"]) == len(probs)
    by_path = dict(zip([str(i[0]) for i in items], probs))
    expected = rps.predict(model, run["test_images"])
    np.testing.assert_allclose([by_path[p] for p in run["test_images"]], expected, rtol=1e-4, atol=1e-5)
    assert [r[0] for r in rows] == ["bilinear", "nearest", "transposed_conv", "mean (3 generators)"]
    assert list(labels) == [i[1] for i in items]


def test_predict_takes_any_size_and_mode(run):
    # Smaller images are padded, larger ones cropped; 16-bit, palette, RGBA and grayscale all work.
    model = rps.load_detector(run["best"], device="cpu")
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (100, 140, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (300, 260, 4), dtype=np.uint8), mode="RGBA"),
        Image.fromarray(rng.integers(0, 255, (224, 224), dtype=np.uint8), mode="L"),
        Image.fromarray(rng.integers(0, 65535, (240, 240), dtype=np.uint16)),
        Image.fromarray(rng.integers(0, 255, (230, 230, 3), dtype=np.uint8)).convert("P"),
    ]
    probs = rps.predict(model, images)
    assert probs.shape == (len(images),)
    assert np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()


def test_evaluate_folder_skips_unreadable_images(run, tmp_path):
    copy = tmp_path / "test"
    shutil.copytree(run["root"] / "data/test", copy)
    (copy / "nearest/1_fake/broken.png").write_bytes(b"\x89PNG truncated")
    model = rps.load_detector(run["best"], device="cpu")
    _, items, labels, probs, _ = rps.evaluate_folder(model, copy, batch_size=5, num_workers=0)
    assert len(items) == len(labels) == len(probs) == len(run["test_images"])
    assert not [i for i in items if i[0].endswith("broken.png")]


class NotATensor:
    pass


def test_read_checkpoint_refuses_unsafe_or_foreign_files(tmp_path):
    with pytest.raises(rps.UserError):
        rps.read_checkpoint(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(rps.UserError):
        rps.read_checkpoint(garbage)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"format": rps.CHECKPOINT_FORMAT, "config": {}, "model": {}, "payload": NotATensor()}, unsafe)
    with pytest.raises(rps.UserError):  # weights_only=True refuses to unpickle arbitrary classes
        rps.read_checkpoint(unsafe)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(rps.UserError):
        rps.read_checkpoint(foreign)


def test_vit_l14_checkpoint_is_small(tmp_path, capsys):
    # The real configuration: ViT-L/14 (random weights, built here) with the default constants.
    # Only the head is saved, so the file stays far below the 1.2 GB of CLIP's weights.
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768)
    CLIPVisionModel(config).save_pretrained(tmp_path / "vit_l14")
    cfg = rps.default_config()
    cfg.CLIP_MODEL, cfg.DEVICE = str(tmp_path / "vit_l14"), "cpu"
    model = rps.build_model(cfg, torch.device("cpu"))
    assert len(model.backbone.blocks) == 24 and model.backbone.width == 1024
    path = tmp_path / "vit_l14_head.pth"
    rps.atomic_torch_save(rps.make_checkpoint(model, 1, {"acc": 1.0}, []), path)
    size_mb = path.stat().st_size / 1e6
    with capsys.disabled():
        print(f"\n[ViT-L/14 checkpoint: {size_mb:.1f} MB]")
    assert size_mb < 100
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(checkpoint["model"]) == set(model.trainable_state_dict())
    assert not [k for k in checkpoint["model"] if k.startswith("backbone.")]


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_load_detector_refuses_missing_or_unexpected_weights(run, tmp_path, change):
    checkpoint = torch.load(run["best"], map_location="cpu", weights_only=True)
    if change == "missing":  # a random classifier must never be used silently
        del checkpoint["model"]["classifier.weight"]
    else:
        checkpoint["model"]["extra_layer.weight"] = torch.zeros(2)
    path = tmp_path / f"{change}.pth"
    torch.save(checkpoint, path)
    key = "classifier.weight" if change == "missing" else "extra_layer.weight"
    with pytest.raises(rps.UserError, match=rf"does not match this model \(.*{key}"):
        rps.load_detector(path, device="cpu")


# --------------------------------------------------------------------------- architecture apart, provenance, format 3

def test_load_detector_builds_the_model_from_the_architecture_and_the_scoring_constants(run, tmp_path):
    checkpoint = torch.load(run["best"], map_location="cpu", weights_only=True)
    expected = rps.predict(rps.load_detector(run["best"], device="cpu"), run["test_images"])
    # The run's files, machine and optimisation are not needed to rebuild and score the detector.
    scoring = {name: checkpoint["run_config"][name] for name in rps.SCORING_CONSTANTS}
    path = tmp_path / "architecture_only.pth"
    torch.save({**checkpoint, "run_config": scoring}, path)
    model = rps.load_detector(path, device="cpu")
    assert model.config == {**checkpoint["architecture"], **scoring}
    np.testing.assert_array_equal(rps.predict(model, run["test_images"]), expected)


def test_a_format_3_checkpoint_with_every_constant_in_one_config_still_loads(run, tmp_path):
    checkpoint = torch.load(run["best"], map_location="cpu", weights_only=True)
    expected = rps.predict(rps.load_detector(run["best"], device="cpu"), run["test_images"])
    old = {key: value for key, value in checkpoint.items()
           if key not in ("architecture", "run_config", "model_code_sha256", "git_commit")}
    old.update(format=3, config=rps.checkpoint_config(checkpoint), script_sha256="0" * 64)
    path = tmp_path / "format_3.pth"
    torch.save(old, path)
    read = rps.read_checkpoint(path)
    assert (read["architecture"], read["run_config"]) == (checkpoint["architecture"], checkpoint["run_config"])
    np.testing.assert_array_equal(rps.predict(rps.load_detector(path, device="cpu"), run["test_images"]), expected)


def provenance_of(script_text, folder):
    """(model_code_sha256(), git_commit()) of a copy of the script with `script_text`, alone in `folder`."""
    folder.mkdir()
    (folder / "rine_plus_ssca.py").write_text(script_text)
    code = "import rine_plus_ssca as r; print(r.model_code_sha256(), r.git_commit())"
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH="", PYTHONDONTWRITEBYTECODE="1"))
    assert result.returncode == 0, result.stderr
    return tuple(result.stdout.split())


def test_provenance_follows_the_model_code_not_the_messages(run, tmp_path):
    checkpoint = torch.load(run["best"], map_location="cpu", weights_only=True)
    assert checkpoint["model_code_sha256"] == rps.model_code_sha256() and "script_sha256" not in checkpoint
    assert checkpoint["git_commit"] == rps.git_commit()
    text = (REPO / "rine_plus_ssca.py").read_text()
    message, model_line = "Nothing to resume: there is no", "        self.classifier = nn.Linear(dim, 1)\n"
    assert text.count(message) == 1 and text.count(model_line) == 1
    original = provenance_of(text, tmp_path / "original")
    edited_message = provenance_of(text.replace(message, "Nothing to resume here: no"), tmp_path / "message")
    edited_model = provenance_of(text.replace(model_line, model_line.replace("(dim, 1)", "(dim, 1, bias=True)")),
                                 tmp_path / "model")
    assert original[0] == rps.model_code_sha256()  # the same code wherever the file lies
    assert edited_message[0] == original[0] and edited_model[0] != original[0]
    assert original[1] == "None"  # a copy outside any git checkout: no commit, no failure
