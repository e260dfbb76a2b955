"""Speed and scale: the feature cache changes nothing but speed, and torchrun evaluates what one process would.

Runs go through the command line with the tiny CLIP-shaped backbone of conftest; independent runs are
started side by side (one thread each) to keep the file within a couple of minutes on a 2-core CPU.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rine_plus_ssca as rps
from rine_plus_ssca_tools import feature_cache
from conftest import SCRIPT, run_script, small_config, write_demo_tree

TINY_ARGS = ["--batch-size", "8", "--proj-dim", "32", "--spec-channels", "16", "--fusion-dim", "32",
             "--fusion-heads", "4", "--num-workers", "0", "--device", "cpu", "--amp", "bf16"]
# AMP given, not "auto": the bf16 backbone path on every CPU, not only where the CPU has bf16 instructions
# (the float32 path: tests/test_evaluation.py, tests/test_readme_promises.py).
# 48 training images: 6 full batches of 8, so every (image, view) entry is read in every epoch.
LAYOUT = {"train": {"nearest": 12, "bilinear": 12}, "val": {"nearest": 4, "bilinear": 4}}
CACHED_RUN = ["--deterministic", "--epochs", "2", "--cache-views", "2", "--seed", "0"]


def train_args(data_dir, backbone, checkpoint_dir, *extra):
    return [*TINY_ARGS, "--clip-model", backbone, "--data-dir", data_dir, "--checkpoint-dir", checkpoint_dir, *extra]


def run_side_by_side(jobs, max_workers=2):
    """{name: (args, cwd)} -> {name: CompletedProcess}, at most max_workers processes at a time."""
    with ThreadPoolExecutor(max_workers) as pool:
        futures = {name: pool.submit(run_script, args, cwd, 900, {"OMP_NUM_THREADS": "1"})
                   for name, (args, cwd) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_model(expected_dir, got_dir, what, atol=1e-6):
    """The last checkpoints of two runs: all head tensors allclose, and the same history."""
    expected, got = load(Path(expected_dir) / rps.LAST_NAME), load(Path(got_dir) / rps.LAST_NAME)
    assert expected["model"].keys() == got["model"].keys(), what
    different = [k for k in expected["model"]
                 if not torch.allclose(expected["model"][k], got["model"][k], rtol=0, atol=atol)]
    assert not different, f"{what}: tensors differ: {different[:5]}"
    assert len(expected["history"]) == len(got["history"]), what
    for first, second in zip(expected["history"], got["history"]):
        assert first.keys() == second.keys(), what
        for key in first:
            assert second[key] == pytest.approx(first[key], abs=1e-6), (what, first["epoch"], key)


def cache_folders(cache_dir, split):
    return sorted(p for p in Path(cache_dir).glob(f"{split}-*") if p.is_dir())


def cache_lines(stdout):
    """{split: the 'feature cache for <split>: ...' line}."""
    return {m.group(1): m.group(0) for m in re.finditer(r"^feature cache for (\w+): .*$", stdout, re.M)}


def token_dtype(meta):
    return {"uint16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[meta["dtypes"]["tokens"]]


# =========================================================================== 6. the feature cache

class CacheRuns:
    """The runs of the cache tests, in stages; each stage starts its runs side by side when first asked for."""

    def __init__(self, root, tree, backbone):
        self.root, self.tree, self.backbone = root, tree, backbone
        self._stages = {}

    def args(self, name, *extra):
        return train_args(self.tree, self.backbone, self.root / name, *CACHED_RUN, *extra)

    def stage1(self):
        """Uncached and cached (filling the cache) runs with the same seed."""
        if 1 not in self._stages:
            self._stages[1] = run_side_by_side({
                "uncached": (self.args("uncached"), self.root),
                "cached": (self.args("cached", "--cache-features", "--cache-dir", self.root / "cache"), self.root),
            })
        return self._stages[1]

    def stage2(self):
        """Runs on the filled cache: another XI, damaged entries (with and without worker processes), a lost meta.json."""
        if 2 not in self._stages:
            assert_ok(self.stage1()["cached"])
            self.damaged = {}
            for name in ("damaged", "damaged_workers", "no_meta"):
                shutil.copytree(self.root / "cache", self.root / f"cache_{name}")
            for name in ("damaged", "damaged_workers"):
                self.damaged[name] = damage_entries(cache_folders(self.root / f"cache_{name}", "train")[0])
            (cache_folders(self.root / "cache_no_meta", "train")[0] / "meta.json").unlink()
            cached = lambda name, *extra: (self.args(name, "--cache-features", "--cache-dir", self.root / f"cache_{name}",  # noqa: E731
                                                      *extra), self.root)
            self._stages[2] = run_side_by_side({
                "cached_xi": (self.args("cached_xi", "--xi", "0.4", "--cache-features", "--cache-dir", self.root / "cache"),
                              self.root),
                "uncached_xi": (self.args("uncached_xi", "--xi", "0.4"), self.root),
                "damaged": cached("damaged"),
                "damaged_workers": cached("damaged_workers", "--num-workers", "2"),
                "no_meta": cached("no_meta"),
            })
        return self._stages[2]

    def stage3(self):
        """A training image rewritten, then a cached run on the original cache folder."""
        if 3 not in self._stages:
            self.stage2()  # its runs read the original images
            self.before = {split: cache_folders(self.root / "cache", split) for split in ("train", "val")}
            image = sorted((self.tree / "train/nearest/0_real").glob("*.png"))[0]
            Image.fromarray(rps.make_demo_image(np.random.default_rng(123), False)).save(image)
            args = train_args(self.tree, self.backbone, self.root / "changed", "--deterministic", "--epochs", "1",
                              "--cache-views", "2", "--cache-features", "--cache-dir", self.root / "cache")
            self._stages[3] = run_script(args, cwd=self.root, env_extra={"OMP_NUM_THREADS": "1"})
        return self._stages[3]


def damage_entries(folder):
    """Flip one byte in the pixels of two entries and in the tokens of a third; returns the damaged (index, view)s."""
    meta = json.loads((folder / "meta.json").read_text())
    damaged = {"pixels": [(0, 0), (5, 1)], "tokens": [(17, 0)]}
    for name, entries in damaged.items():
        shape = meta["shapes"][name]
        entry_bytes = int(np.prod(shape[2:])) * np.dtype(meta["dtypes"][name]).itemsize
        data = np.memmap(folder / f"{name}.bin", dtype=np.uint8, mode="r+")
        for index, view in entries:
            offset = (index * shape[1] + view) * entry_bytes + entry_bytes // 2 + 1
            data[offset] ^= 0xFF
        data.flush()
        del data
    return sorted(e for entries in damaged.values() for e in entries)


@pytest.fixture(scope="module")
def cache_runs(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("cache_runs")
    tree = write_demo_tree(root / "data", LAYOUT, seed=11)
    return CacheRuns(root, tree, tiny_backbone)


def test_cached_and_uncached_runs_train_the_same_model(cache_runs):
    runs = cache_runs.stage1()
    assert_ok(runs["uncached"])
    cached = assert_ok(runs["cached"])
    assert "feature cache" not in runs["uncached"].stdout
    lines = cache_lines(cached.stdout)
    assert set(lines) == {"train", "val"} and all("up to" in line for line in lines.values()), lines  # made now
    train_folder, = cache_folders(cache_runs.root / "cache", "train")
    assert (np.fromfile(train_folder / "state.bin", dtype=np.uint8) == feature_cache.FILLED).all()  # both views filled
    assert_same_model(cache_runs.root / "uncached", cache_runs.root / "cached", "cached vs uncached")


def test_a_second_run_with_another_head_constant_reads_the_cache(cache_runs):
    runs = cache_runs.stage2()
    cached, uncached = assert_ok(runs["cached_xi"]), assert_ok(runs["uncached_xi"])
    lines = cache_lines(cached.stdout)
    assert set(lines) == {"train", "val"} and all(line.endswith("100% filled") for line in lines.values()), lines
    assert "damaged" not in cached.stdout
    assert load(cache_runs.root / "cached_xi" / rps.LAST_NAME)["run_config"]["XI"] == 0.4
    assert_same_model(cache_runs.root / "uncached_xi", cache_runs.root / "cached_xi", "cached vs uncached, XI 0.4")
    # XI really changed the training: the XI 0.4 model differs from the XI 0.2 one.
    first = load(cache_runs.root / "uncached" / rps.LAST_NAME)["model"]
    second = load(cache_runs.root / "uncached_xi" / rps.LAST_NAME)["model"]
    assert any(not torch.allclose(first[k], second[k]) for k in first)


def test_damaged_entries_are_recomputed_never_used(cache_runs):
    result = assert_ok(cache_runs.stage2()["damaged"])
    damaged = cache_runs.damaged["damaged"]
    assert f"feature cache: {len(damaged)} damaged entries were recomputed" in result.stdout, result.stdout[-2000:]
    assert_same_model(cache_runs.root / "uncached", cache_runs.root / "damaged", "damaged cache vs uncached")
    # Recomputed and stored again: the repaired files equal the undamaged cache byte for byte.
    original, = cache_folders(cache_runs.root / "cache", "train")
    repaired, = cache_folders(cache_runs.root / "cache_damaged", "train")
    for name in ("pixels", "tokens", "state", "crc"):
        assert (original / f"{name}.bin").read_bytes() == (repaired / f"{name}.bin").read_bytes(), name


def test_damaged_entries_are_reported_with_worker_processes(cache_runs):
    # NUM_WORKERS defaults to 8: the cache is read in DataLoader workers, and the damage must still be reported.
    result = assert_ok(cache_runs.stage2()["damaged_workers"])
    assert_same_model(cache_runs.root / "uncached", cache_runs.root / "damaged_workers", "damaged cache, workers")
    damaged = cache_runs.damaged["damaged_workers"]
    assert f"feature cache: {len(damaged)} damaged entries were recomputed" in result.stdout, result.stdout[-2000:]


def test_interrupted_fill_is_rebuilt(cache_runs):
    result = assert_ok(cache_runs.stage2()["no_meta"])
    lines = cache_lines(result.stdout)
    assert "up to" in lines["train"] and lines["val"].endswith("100% filled"), lines  # train made anew, val reused
    folder, = cache_folders(cache_runs.root / "cache_no_meta", "train")
    assert json.loads((folder / "meta.json").read_text()) == json.loads(
        (cache_folders(cache_runs.root / "cache", "train")[0] / "meta.json").read_text())
    assert (np.fromfile(folder / "state.bin", dtype=np.uint8) == feature_cache.FILLED).all()
    assert_same_model(cache_runs.root / "uncached", cache_runs.root / "no_meta", "rebuilt cache vs uncached")


def test_a_truncated_cache_file_is_rebuilt(cache_runs, tmp_path):
    assert_ok(cache_runs.stage1()["cached"])
    source, = cache_folders(cache_runs.root / "cache", "train")
    meta = json.loads((source / "meta.json").read_text())

    def open_copy(name, damage=None):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        if damage:
            damage(folder)
        pixels, tokens = meta["shapes"]["pixels"], meta["shapes"]["tokens"]
        cache = feature_cache.FeatureCache(folder, pixels[0], pixels[1], tokens[2], tokens[3], pixels[3], token_dtype(meta))
        return cache, cache.create_or_open()

    intact, made = open_copy("intact")
    assert made is False and intact.filled_fraction() == 1.0  # the same description opens the filled cache

    def truncate(folder):
        with open(folder / "tokens.bin", "r+b") as f:
            f.truncate((folder / "tokens.bin").stat().st_size // 2)

    rebuilt, made = open_copy("truncated", truncate)
    assert made is True and rebuilt.filled_fraction() == 0.0  # nothing of the half-written cache is trusted
    expected_size = int(np.prod(meta["shapes"]["tokens"])) * np.dtype(meta["dtypes"]["tokens"]).itemsize
    assert (rebuilt.folder / "tokens.bin").stat().st_size == expected_size
    assert rebuilt.get(0, 0) is None


def test_a_changed_image_opens_a_new_cache(cache_runs):
    result = assert_ok(cache_runs.stage3())
    before = cache_runs.before
    after = {split: cache_folders(cache_runs.root / "cache", split) for split in ("train", "val")}
    assert len(before["train"]) == 1
    new = [folder for folder in after["train"] if folder not in before["train"]]
    assert len(new) == 1 and before["train"][0] in after["train"], after  # a new key; the old folder untouched
    assert after["val"] == before["val"]  # validation images did not change: same key, reused
    lines = cache_lines(result.stdout)
    assert str(new[0]) in lines["train"] and "up to" in lines["train"], lines
    assert lines["val"].endswith("100% filled"), lines


def test_the_cache_key_follows_the_training_recipe_but_not_the_learning_rate(tmp_path, tiny_backbone):
    # The recipe decides the cached crops (on the grid or anywhere); LR and its schedule only the head.
    items, _ = rps.scan_image_folder(write_demo_tree(tmp_path / "data", {"train": {"nearest": 2}}) / "train")
    cfg = small_config(tiny_backbone, CHECKPOINT_DIR=str(tmp_path / "ckpt"))
    backbone = rps.RINEPlusSSCA(cfg).backbone

    def folder(**change):
        return feature_cache.feature_cache_folder("train", items, small_config(tiny_backbone, **{**vars(cfg), **change}), backbone, 2)

    assert folder(TRAIN_RECIPE="rine") != folder(TRAIN_RECIPE="grid") == folder()
    assert folder(LR_DROP_EPOCHS="6,11") == folder(LR=1e-4) == folder()


def another_valid_value(name, value):
    """A value of the constant `name` other than `value` that its declaration allows."""
    constant = rps.CONSTANTS[name]
    if constant.choices:
        return next(c for c in constant.choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return None  # paths, devices, block lists: no pixel of a view depends on them (checked below by running)
    for candidate in (value * 2, value / 2, value + 1, value - 1, 1, 0.5):
        candidate = type(value)(candidate)
        if candidate != value and not rps.constant_problem(constant, candidate):
            return candidate
    raise AssertionError(f"no other valid value found for {name}")


def views_of(cfg, images):
    """The pixels a cached training run stores (seeded training views) and the validation crops."""
    train, test = rps.build_transform(cfg, train=True), rps.build_transform(cfg, train=False)
    views = []
    for index, image in enumerate(images):
        for view in range(6):
            seed = rps.sample_seed(cfg.DATA_SEED, index, view)  # the sampler's view seed
            views.append(train(image, torch.Generator().manual_seed(seed)))
        views.append(test(image).numpy())
    return views


def test_every_constant_that_changes_a_cached_view_changes_the_cache_folder(tmp_path, tiny_backbone):
    # Derived from behaviour, not from a list: each constant is changed in turn; when any stored view's pixels
    # change, the constant must be in the cache's key (declared INPUTS), and the folder name must change.
    root = write_demo_tree(tmp_path / "data", {"train": {"nearest": 2}}, size=200)
    items, _ = rps.scan_image_folder(root / "train")
    images = [rps.open_image(path) for path, _, _ in items]
    cfg = small_config(tiny_backbone, CHECKPOINT_DIR=str(tmp_path / "ckpt"))
    backbone = rps.RINEPlusSSCA(cfg).backbone
    reference_views = views_of(cfg, images)
    reference_folder = feature_cache.feature_cache_folder("train", items, cfg, backbone, 2)
    changing = []
    for name in rps.CONFIG_NAMES:
        other = another_valid_value(name, getattr(cfg, name))
        if other is None:
            continue
        changed = small_config(tiny_backbone, **{**vars(cfg), name: other})
        views = views_of(changed, images)
        if any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(views, reference_views)):
            changing.append(name)
            assert name in rps.INPUT_CONSTANTS, f"{name} changes the cached pixels but is not declared INPUTS"
            assert feature_cache.feature_cache_folder("train", items, changed, backbone, 2) != reference_folder, name
    # The augmentation constants were among those found (the test itself can see a change).
    assert {"CROP_SIZE", "TRAIN_RECIPE", "TEST_CROP", "BLUR_PROB", "JPEG_QUALITY_MIN", "DATA_SEED"} <= set(changing), changing
    assert "SEED" not in changing  # the head's seed leaves the views alone: --seeds shares one cache


# =========================================================================== 7. torchrun

@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("torchrun")
    tree = write_demo_tree(root / "data", {"train": {"nearest": 8, "bilinear": 8}, "val": {"nearest": 5, "bilinear": 5}},
                           seed=21)
    # Validation with a few images in the wrong folder (metrics below 1, so agreement means something),
    # and an odd count, so the two processes hold shards of different sizes.
    rng = np.random.default_rng(22)
    for i, (folder, fake) in enumerate([("0_real", True), ("0_real", True), ("1_fake", False)]):
        Image.fromarray(rps.make_demo_image(rng, fake)).save(tree / f"val/nearest/{folder}/wrong_{i}.png")
    args = train_args(tree, tiny_backbone, root / "ckpt", "--epochs", "1", "--seed", "0")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(SCRIPT), *map(str, args)]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    return result, root, tree


def test_torchrun_on_cpu_trains_and_validates_like_one_process(torchrun_run):
    result, root, tree = torchrun_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x 2 processes" in result.stdout  # it really ran distributed
    # Rank 0 speaks; the other rank prints nothing (neither the epoch line nor a progress bar).
    assert len(re.findall(r"^epoch 1: train bce", result.stdout, re.M)) == 1, result.stdout[-3000:]
    assert len(re.findall(r"epoch 1/1:\s+0%", result.stderr)) == 1, result.stderr[-3000:]

    best = root / "ckpt" / rps.BEST_NAME
    model = rps.load_detector(best, device="cpu", calibrated=False)  # validation metrics are of the raw P(fake)
    stored, calibration = load(best)["metrics"], load(best)["calibration"]
    rows, items, labels, probs, logits = rps.evaluate_folder(model, tree / "val", batch_size=8, num_workers=0)
    expected = rps.binary_metrics(labels, probs, model.config["THRESHOLD"])
    n_files = len(list((tree / "val").rglob("*.png")))
    assert stored["n_real"] + stored["n_fake"] == n_files == len(labels)  # every image once, none twice
    for key in ("n_real", "n_fake", "acc", "ap", "auc"):
        assert stored[key] == pytest.approx(expected[key], abs=1e-6), (key, stored[key], expected[key])
    mean_bce = float(np.mean(-np.where(labels == 1, np.log(np.clip(probs, 1e-7, 1 - 1e-7)),
                                       np.log(np.clip(1 - probs, 1e-7, 1 - 1e-7)))))
    assert stored["val_bce"] == pytest.approx(mean_bce, rel=1e-4)
    # The temperature was fitted on the logits of both processes' shares, gathered.
    assert calibration["n_images"] == n_files
    assert calibration["temperature"] == pytest.approx(rps.fit_temperature(logits, labels)[0], rel=1e-4)
    assert rows[-1][0] == "mean (2 generators)" and rows[-1][1] == expected["n_real"] and rows[-1][2] == expected["n_fake"]


def test_compile_trains_end_to_end_and_computes_what_the_eager_model_computes(tmp_path, tiny_backbone):
    # COMPILE must run a whole training through the CLI (the complex FFT path stays eager) ...
    tree = write_demo_tree(tmp_path / "data", {"train": {"nearest": 8, "bilinear": 8}, "val": {"nearest": 4}}, seed=3)
    result = assert_ok(run_script(train_args(tree, tiny_backbone, tmp_path / "compiled", "--epochs", "1", "--amp", "off",
                                             "--compile"), tmp_path, 900, {"OMP_NUM_THREADS": "1"}))
    checkpoint = load(tmp_path / "compiled" / "best_rine_plus_ssca.pth")
    assert checkpoint["run_config"]["COMPILE"] is True and np.isfinite(checkpoint["metrics"]["val_bce"]), result.stdout[-2000:]
    # ... and the compiled module computes the eager one's logits (training then differs only by
    # float rounding, which Adam amplifies, so whole runs are not compared).
    model = rps.load_detector(tmp_path / "compiled" / "best_rine_plus_ssca.pth", device="cpu")
    pixels = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        eager_logits, _ = model(pixels)
        compiled_logits, _ = torch.compile(model)(pixels)
    assert torch.allclose(eager_logits, compiled_logits, atol=1e-4), (eager_logits - compiled_logits).abs().max()
