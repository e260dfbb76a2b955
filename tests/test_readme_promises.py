"""Behaviours the README promises, each guarded by a test that fails when the behaviour breaks.

DDP training equals one process, the XI=0 ablation, --threshold, the best-epoch and resume rules,
the training view and the epoch order, checkpoint round trips and atomic writes, the `skipped`
column, a decompression bomb in a training set, and the CPU's float32 and bf16 backbone paths.
"""

import csv
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import rine_plus_ssca as rps
from conftest import SCRIPT, clip_pixels, run_script, small_config, write_demo_tree

TINY_ARGS = ["--batch-size", "8", "--proj-dim", "32", "--spec-channels", "16", "--fusion-dim", "32",
             "--fusion-heads", "4", "--num-workers", "0", "--device", "cpu", "--amp", "off"]
LAYOUT = {"train": {"nearest": 4, "bilinear": 4}, "val": {"nearest": 2, "bilinear": 2},
          "test": {"nearest": 3, "bilinear": 3}}


def train_args(data_dir, backbone, checkpoint_dir, *extra):
    return [*TINY_ARGS, "--clip-model", backbone, "--data-dir", data_dir, "--checkpoint-dir", checkpoint_dir,
            *map(str, extra)]


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_demo_tree(tmp_path_factory.mktemp("guards") / "data", LAYOUT, seed=5)


@pytest.fixture(scope="module")
def trained(trained_checkpoint):
    """The test run's shared checkpoint (conftest): its best and last checkpoints, configuration, test images."""
    return trained_checkpoint


# =========================================================================== 1. DDP equals one process

def torchrun(args, cwd):
    """The script under torchrun with 2 CPU processes. --standalone lets torchrun bind a free port itself
    and keep it: a port chosen here and bound later could be taken in between."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
               *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_two_processes_train_the_same_weights_as_one(tmp_path, tiny_backbone):
    # RINE mode (no BatchNorm: on the CPU each process would normalise its own share), no dropout
    # (its masks depend on each process's RNG) and XI=0 (SupCon pairs form within a process's share).
    # The weight decay makes Adam's step depend on the gradient's scale, so a BCE missing its
    # `* world_size` (half the gradient) trains other weights.
    tree = write_demo_tree(tmp_path / "data", {"train": {"nearest": 4, "bilinear": 4}, "val": {"nearest": 2}}, seed=8)
    extra = ["--no-use-spectral", "--dropout", "0", "--xi", "0", "--deterministic", "--weight-decay", "0.5",
             "--epochs", "1", "--seed", "3", "--lr", "0.01"]
    one = assert_ok(run_script(train_args(tree, tiny_backbone, tmp_path / "one", *extra), cwd=tmp_path))
    two = assert_ok(torchrun(train_args(tree, tiny_backbone, tmp_path / "two", *extra), cwd=tmp_path))
    assert "x 2 processes" in two.stdout and "x 2 processes" not in one.stdout
    expected, got = load(tmp_path / "one" / rps.LAST_NAME)["model"], load(tmp_path / "two" / rps.LAST_NAME)["model"]
    initial = rps.RINEPlusSSCA(small_config(tiny_backbone, USE_SPECTRAL=False, DROPOUT=0.0)).trainable_state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    assert any(not torch.equal(expected[k], initial[k]) for k in expected if k in initial)  # it did train


# =========================================================================== 2. XI = 0

def one_batch(tree, cfg):
    items, _ = rps.prepare_splits(cfg)
    loader = rps.make_loader(items, cfg, train=True, device=torch.device("cpu"),
                             sampler=rps.SeededEpochSampler(len(items), 0, 8, drop_last=True), batch_size=8)
    return next(iter(loader))


@pytest.mark.parametrize("xi", [0.0, 0.5])
def test_a_training_step_with_xi_zero_leaves_supcon_out(tree, make_cfg, xi):
    cfg = make_cfg(XI=xi, DATA_DIR=str(tree))
    torch.manual_seed(0)
    model = rps.RINEPlusSSCA(cfg).train()
    optimizer = rps.make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = one_batch(tree, cfg)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    learner = rps.Learner(model, model, optimizer, scaler, torch.device("cpu"), None)
    bce, supcon, loss = rps.training_step(learner, batch, cfg)
    rps.update_weights(learner)
    projection = [p for name, p in model.named_parameters() if name.startswith("supcon_projection.")]
    assert projection
    if xi == 0:
        assert supcon.item() == 0 and loss.item() == pytest.approx(bce.item())
        assert all(p.grad is None for p in projection)  # no gradient at all, not a zero one
    else:
        assert supcon.item() > 0 and loss.item() == pytest.approx(bce.item() + xi * supcon.item(), rel=1e-5)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projection)
    after = model.trainable_state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("classifier.") for k in moved)
    assert any(k.startswith("supcon_projection.") for k in moved) == (xi > 0)


def test_xi_zero_trains_another_model_and_logs_no_supcon(tree, tiny_backbone, tmp_path):
    runs = {}
    for xi in (0.0, 0.2):
        cfg = small_config(tiny_backbone, DATA_DIR=str(tree), CHECKPOINT_DIR=str(tmp_path / f"xi{xi}"), EPOCHS=1, XI=xi)
        runs[xi] = load(Path(rps.train(cfg)).with_name(rps.LAST_NAME))
    assert runs[0.0]["history"][0]["train_supcon"] == 0
    assert runs[0.2]["history"][0]["train_supcon"] > 0
    zero, point_two = runs[0.0]["model"], runs[0.2]["model"]
    assert zero.keys() == point_two.keys()
    assert not torch.equal(zero["classifier.weight"], point_two["classifier.weight"])


# =========================================================================== 3. --threshold

def threshold_between(scores):
    """A threshold that splits the scores and calls a different number of them fake than 0.5 does."""
    values = np.sort(np.unique(scores))
    middles = (values[:-1] + values[1:]) / 2
    at_half = int((scores >= 0.5).sum())
    chosen = [t for t in middles if int((scores >= t).sum()) != at_half]
    assert chosen, scores
    return float(chosen[len(chosen) // 2])


def test_threshold_changes_predict_verdicts_as_computed_from_the_scores(trained, tmp_path, capsys):
    model = rps.load_detector(trained["best"], device="cpu")
    paths = trained["test_images"]
    scores = rps.predict(model, paths)
    threshold = threshold_between(scores)
    out = tmp_path / "predict.csv"
    assert rps.main(["predict", *paths, "--ckpt", str(trained["best"]), "--threshold", str(threshold),
                     "--num-workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == paths
    np.testing.assert_allclose([float(r["p_fake"]) for r in rows], scores, atol=1e-5)
    assert [r["verdict"] for r in rows] == ["fake" if s >= threshold else "real" for s in scores]
    n_fake = int((scores >= threshold).sum())
    assert f"({n_fake} fake, {len(paths) - n_fake} real at threshold {threshold})" in capsys.readouterr().out


def test_threshold_changes_eval_accuracy_as_computed_from_the_scores(trained, tmp_path):
    model = rps.load_detector(trained["best"], device="cpu")
    paths = trained["test_images"]
    scores = dict(zip(paths, rps.predict(model, paths)))
    threshold = threshold_between(np.array(list(scores.values())))
    args = rps.build_eval_parser().parse_args(["--ckpt", str(trained["best"]), "--data", str(trained["cfg"].DATA_DIR + "/test"),
                                               "--threshold", str(threshold), "--num-workers", "0", "--device", "cpu",
                                               "--out", str(tmp_path)])
    rows = {row[1]: dict(zip(rps.METRIC_COLUMNS, row[2:])) for row in rps.run_eval(args)}
    generators = sorted(folder.name for folder in (Path(trained["cfg"].DATA_DIR) / "test").iterdir())
    assert len(generators) >= 2 and set(rows) == {*generators, f"mean ({len(generators)} generators)"}
    for generator in generators:
        real = np.array([s for p, s in scores.items() if f"/{generator}/0_real/" in p])
        fake = np.array([s for p, s in scores.items() if f"/{generator}/1_fake/" in p])
        assert rows[generator]["real_acc"] == pytest.approx((real < threshold).mean())
        assert rows[generator]["fake_acc"] == pytest.approx((fake >= threshold).mean())
        expected_acc = ((real < threshold).sum() + (fake >= threshold).sum()) / (len(real) + len(fake))
        assert rows[generator]["acc"] == pytest.approx(expected_acc)


# =========================================================================== 4. selection and resume rules

def metrics(acc=0.5, ap=0.5, auc=0.5, val_bce=0.5):
    return dict(acc=acc, ap=ap, auc=auc, val_bce=val_bce)


@pytest.mark.parametrize("metric", ["acc", "ap", "auc"])
def test_is_better_takes_the_higher_score_and_breaks_ties_by_loss(metric):
    best = metrics(**{metric: 0.8}, val_bce=0.4)
    assert rps.is_better(metric, metrics(**{metric: 0.9}, val_bce=0.9), best)
    assert not rps.is_better(metric, metrics(**{metric: 0.7}, val_bce=0.1), best)
    assert rps.is_better(metric, metrics(**{metric: 0.8}, val_bce=0.3), best)  # tie: lower loss wins
    assert not rps.is_better(metric, metrics(**{metric: 0.8}, val_bce=0.4), best)  # a full tie keeps the first
    # Only the chosen metric counts.
    others = {name: 0.99 for name in ("acc", "ap", "auc") if name != metric}
    assert not rps.is_better(metric, {**metrics(**{metric: 0.7}, val_bce=0.5), **others}, best)
    assert rps.is_better(metric, metrics(), None)
    assert rps.is_better(metric, metrics(), metrics(**{metric: float("nan")}))
    assert not rps.is_better(metric, metrics(**{metric: float("nan")}), None)


def test_is_better_with_loss_takes_the_lower_loss():
    best = metrics(ap=0.5, val_bce=0.4)
    assert rps.is_better("loss", metrics(ap=0.1, val_bce=0.3), best)
    assert not rps.is_better("loss", metrics(ap=0.99, val_bce=0.5), best)
    assert not rps.is_better("loss", metrics(val_bce=0.4), best)
    assert rps.is_better("loss", metrics(val_bce=2.0), None)


@pytest.mark.parametrize("change", [dict(PROJ_DIM=16), dict(USE_TIE=False), dict(BLOCKS="1,3"), dict(CROP_SIZE=192)],
                         ids=lambda c: next(iter(c)))
def test_resume_refuses_changed_architecture_constants(trained, change):
    cfg = small_config(trained["cfg"].CLIP_MODEL, **{**{n: getattr(trained["cfg"], n) for n in rps.CONFIG_NAMES}, **change})
    model = rps.RINEPlusSSCA(cfg)
    optimizer = rps.make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(rps.UserError, match=f"Can't resume: {next(iter(change))} differ"):
        rps.restore_last(trained["last"], cfg, model, optimizer, scaler)
    same = trained["cfg"]
    model = rps.RINEPlusSSCA(same)
    state = rps.restore_last(trained["last"], same, model, rps.make_optimizer(model, same), scaler)
    assert (state["epoch"], state["step"]) == (same.EPOCHS + 1, 0)  # a finished run resumes after its last epoch


def test_resume_with_no_last_checkpoint_is_a_user_error(tmp_path, make_cfg):
    cfg = make_cfg(CHECKPOINT_DIR=str(tmp_path))
    model = rps.RINEPlusSSCA(cfg)
    with pytest.raises(rps.UserError, match="Nothing to resume"):
        rps.restore_last(tmp_path / rps.LAST_NAME, cfg, model, rps.make_optimizer(model, cfg),
                         torch.amp.GradScaler("cpu", enabled=False))


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT)])
def test_a_second_stop_signal_stops_at_once(first, second):
    with rps.GracefulStop() as stop:
        signal.raise_signal(first)  # the handler runs before raise_signal returns
        assert stop.requested == first  # the first only asks: training goes on to the end of the step
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(second)
        with pytest.raises(KeyboardInterrupt):
            stop.check()
    assert signal.getsignal(signal.SIGTERM) != stop._handle  # handlers restored


def test_learning_rate_drops_tenfold_from_each_listed_epoch_as_rines_epochs_reduce_lr(make_cfg):
    # RINE: `if epoch + 1 in epochs_reduce_lr: lr /= 10` at the start of each (0-based) epoch, with [6, 11].
    cfg = make_cfg(LR=1e-3, LR_DROP_EPOCHS="6,11")
    rates = [rps.learning_rate(cfg, epoch) for epoch in range(1, 14)]
    assert rates == pytest.approx([1e-3] * 5 + [1e-4] * 5 + [1e-5] * 3, rel=1e-12)
    assert rps.learning_rate(make_cfg(LR=1e-3, LR_DROP_EPOCHS=""), 20) == 1e-3
    for bad in ("0,3", "six", "-1"):
        with pytest.raises(rps.UserError, match="LR_DROP_EPOCHS"):
            rps.validate_config(make_cfg(LR_DROP_EPOCHS=bad))


def test_training_uses_the_dropped_learning_rate_and_resume_keeps_it(tree, tiny_backbone, tmp_path, monkeypatch):
    seen = []
    step = rps.training_step

    def recording_step(learner, *args, **kwargs):
        seen.append(learner.optimizer.param_groups[0]["lr"])
        return step(learner, *args, **kwargs)

    monkeypatch.setattr(rps, "training_step", recording_step)
    common = dict(DATA_DIR=str(tree), LR=1e-3, LR_DROP_EPOCHS="2,3")
    rps.train(small_config(tiny_backbone, CHECKPOINT_DIR=str(tmp_path / "whole"), EPOCHS=3, **common))
    whole, steps = list(seen), len(seen) // 3
    assert steps >= 1 and whole == pytest.approx([1e-3] * steps + [1e-4] * steps + [1e-5] * steps, rel=1e-12)
    seen.clear()  # the same run stopped after epoch 1, then resumed: the optimizer's saved LR is epoch 1's
    rps.train(small_config(tiny_backbone, CHECKPOINT_DIR=str(tmp_path / "split"), EPOCHS=1, **common))
    rps.train(small_config(tiny_backbone, CHECKPOINT_DIR=str(tmp_path / "split"), EPOCHS=3, RESUME=True, **common))
    assert seen == whole


# =========================================================================== 5. training view and epoch order

def pil_jpeg(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def drawn_parameters(augment, image, seed):
    """The draws TrainAugment makes from a generator seeded with `seed`, in its order."""
    generator = torch.Generator().manual_seed(seed)
    uniform = lambda: torch.rand(1, generator=generator).item()  # noqa: E731
    sigma = uniform() * augment.blur_sigma_max if uniform() < augment.blur_prob else 0.0
    quality = torch.randint(augment.jpeg_quality_min, 101, (1,), generator=generator).item() if uniform() < augment.jpeg_prob else None
    tops, lefts = rps.crop_origins(image.height, augment.crop), rps.crop_origins(image.width, augment.crop)
    top = tops[int(torch.randint(0, len(tops), (1,), generator=generator))]
    left = lefts[int(torch.randint(0, len(lefts), (1,), generator=generator))]
    return sigma, quality, top, left, uniform() < 0.5


@pytest.mark.parametrize("seed", range(6))
def test_training_view_is_blur_jpeg_crop_flip_as_pil_does_them(make_cfg, seed):
    cfg = make_cfg(BLUR_PROB=0.5, JPEG_PROB=0.5, BLUR_SIGMA_MAX=3.0, JPEG_QUALITY_MIN=30)
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rps.make_demo_image(rng, True, "bilinear", 256))
    for augment in (rps.TrainAugment(cfg, whole_image=True), rps.TrainAugment(cfg)):
        sigma, quality, top, left, flip = drawn_parameters(augment, image, seed)
        expected = image.filter(ImageFilter.GaussianBlur(radius=sigma)) if sigma > 0 else image
        expected = pil_jpeg(expected, quality) if quality is not None else expected
        expected = np.asarray(expected.crop((left, top, left + 224, top + 224)))
        expected = expected[:, ::-1] if flip else expected
        got = augment(image, torch.Generator().manual_seed(seed))
        np.testing.assert_array_equal(got, expected.transpose(2, 0, 1), err_msg=f"sigma {sigma}, quality {quality}")


def test_training_views_do_blur_and_recompress():
    # Certain blur and JPEG: the view differs from the plain crop (so the comparison above is not vacuous).
    cfg = small_config("unused", BLUR_PROB=1.0, JPEG_PROB=1.0, BLUR_SIGMA_MAX=2.0, JPEG_QUALITY_MIN=30)
    image = Image.fromarray(rps.make_demo_image(np.random.default_rng(1), False, "bilinear", 224))
    augment = rps.TrainAugment(cfg)
    sigma, quality, top, left, flip = drawn_parameters(augment, image, 11)
    assert sigma > 0 and quality is not None and (top, left) == (0, 0)
    plain = np.asarray(image)[:, ::-1] if flip else np.asarray(image)
    got = augment(image, torch.Generator().manual_seed(11)).transpose(1, 2, 0)
    assert np.abs(got.astype(int) - plain.astype(int)).mean() > 1


def test_epoch_order_is_a_seeded_shuffle_and_ranks_split_each_global_batch():
    n, batch = 23, 6
    one = rps.SeededEpochSampler(n, seed=4, batch_size=batch, drop_last=True)
    orders = {}
    for epoch in (1, 2):
        one.set_epoch(epoch)
        orders[epoch] = [i for i, _, _ in one]
        assert len(orders[epoch]) == len(one) == (n // batch) * batch and len(set(orders[epoch])) == len(orders[epoch])
        assert [view for _, _, view in one] == [epoch - 1] * len(one)
        assert [s for _, s, _ in one] == [rps.sample_seed(4, i, epoch - 1) for i in orders[epoch]]
        ranks = []
        for rank in range(2):
            sampler = rps.SeededEpochSampler(n, seed=4, batch_size=batch, drop_last=True, rank=rank, world_size=2)
            sampler.set_epoch(epoch)
            ranks.append([i for i, _, _ in sampler])
        assert not set(ranks[0]) & set(ranks[1])
        for b in range(n // batch):  # global batch b = the union of each rank's local batch b
            local = [r[b * batch // 2:(b + 1) * batch // 2] for r in ranks]
            assert sorted(local[0] + local[1]) == sorted(orders[epoch][b * batch:(b + 1) * batch])
    assert orders[1] != orders[2] and orders[1] != sorted(orders[1])
    again = rps.SeededEpochSampler(n, seed=4, batch_size=batch, drop_last=True)
    again.set_epoch(2, start_batch=1)
    assert [i for i, _, _ in again] == orders[2][batch:]  # a resumed epoch replays the rest of its order


@pytest.mark.parametrize("quality, sigma, factor", [(50, None, None), (None, 2.0, None), (None, None, 0.75), (75, 1.0, 1.5)])
def test_robustness_perturbation_is_what_pil_does(make_cfg, quality, sigma, factor):
    image = Image.fromarray(rps.make_demo_image(np.random.default_rng(2), True, "nearest", 320))
    expected = image
    if factor is not None:
        expected = expected.resize((round(320 * factor), round(320 * factor)), Image.BICUBIC)
    if sigma:
        expected = expected.filter(ImageFilter.GaussianBlur(radius=sigma))
    if quality is not None:
        expected = pil_jpeg(expected, quality)
    pixels = np.asarray(expected)
    top, left = (pixels.shape[0] - 224) // 2 // 8 * 8, (pixels.shape[1] - 224) // 2 // 8 * 8
    transform = rps.build_transform(make_cfg(), False, jpeg_quality=quality, blur_sigma=sigma, resize=factor)
    got = transform(image).numpy()
    np.testing.assert_array_equal(got, pixels[top:top + 224, left:left + 224].transpose(2, 0, 1))
    clean = rps.build_transform(make_cfg(), False)(image).numpy()
    assert np.abs(got.astype(int) - clean.astype(int)).mean() > 0.5  # the perturbation did something


# =========================================================================== 6. checkpoints and the skipped column

def test_checkpoint_round_trip_gives_back_the_exact_weights_and_scores(trained):
    stored = load(trained["best"])["model"]
    first, second = (rps.load_detector(trained["best"], device="cpu") for _ in range(2))
    loaded = first.trainable_state_dict()
    assert loaded.keys() == stored.keys()
    assert all(torch.equal(loaded[k], stored[k]) for k in stored)
    paths = trained["test_images"]
    np.testing.assert_array_equal(rps.predict(first, paths), rps.predict(second, paths))
    # The weights are the trained ones, not a fresh initialisation that happens to fit the shapes.
    torch.manual_seed(trained["cfg"].SEED)
    fresh = rps.RINEPlusSSCA(trained["cfg"]).trainable_state_dict()
    assert any(not torch.equal(fresh[k], stored[k]) for k in stored if k in fresh)


@pytest.mark.parametrize("failing", ["torch.save", "write", "fsync", "os.replace"])
def test_a_write_failing_half_way_keeps_the_old_checkpoint(tmp_path, monkeypatch, failing):
    path = tmp_path / "ckpt" / rps.LAST_NAME
    rps.atomic_torch_save({"weights": torch.arange(5.0)}, path)
    old = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "torch.save":
        monkeypatch.setattr(rps.torch, "save", fail)
    elif failing == "fsync":
        monkeypatch.setattr(rps.os, "fsync", fail)
    elif failing == "os.replace":
        monkeypatch.setattr(rps.os, "replace", fail)
    else:  # the disk fills after the first bytes: part of the file is written, then the write fails
        real_open = open

        class HalfWriter:
            def __init__(self, file):
                self.file = file

            def write(self, data):
                self.file.write(bytes(data[: len(data) // 2]))
                self.file.flush()
                fail()

            def __getattr__(self, name):
                return getattr(self.file, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.file.__exit__(*exc)

        monkeypatch.setattr("builtins.open", lambda *a, **k: HalfWriter(real_open(*a, **k)))
    with pytest.raises(OSError):
        rps.atomic_torch_save({"weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert torch.equal(load(path)["weights"], torch.arange(5.0))
    assert sorted(p.name for p in path.parent.iterdir()) == [rps.LAST_NAME]  # no temporary file left


def test_skipped_column_counts_unreadable_images(trained, tmp_path):
    copy = tmp_path / "test"
    shutil.copytree(Path(trained["cfg"].DATA_DIR) / "test", copy)
    (copy / "nearest/1_fake/broken.png").write_bytes(b"\x89PNG truncated")
    (copy / "nearest/0_real/empty.png").write_bytes(b"")
    model = rps.load_detector(trained["best"], device="cpu")
    items = rps.collect_test_items(str(copy))
    rows, kept, _, _, _ = rps.evaluate_items(model, items, batch_size=4, num_workers=0)
    skipped = {row[0]: row[1 + rps.METRIC_COLUMNS.index("skipped")] for row in rows}
    generators = sorted(folder.name for folder in copy.iterdir())
    expected = {generator: 2 if generator == "nearest" else 0 for generator in generators}
    assert skipped == {**expected, f"mean ({len(generators)} generators)": 2}
    assert len(kept) == len(items) - 2


# =========================================================================== 7. a decompression bomb in a training set

def test_a_decompression_bomb_in_the_training_set_is_skipped_with_workers(tmp_path, tiny_backbone):
    tree = write_demo_tree(tmp_path / "data", {"train": {"nearest": 4, "bilinear": 4}, "val": {"nearest": 2}}, seed=9)
    # More pixels than PIL's limit (about 89 million) but a small file: decoding it would take 270 MB in RGB.
    side = int((Image.MAX_IMAGE_PIXELS + 1) ** 0.5) + 1
    Image.new("1", (side, side)).save(tree / "train/nearest/1_fake/bomb.png")
    result = assert_ok(run_script(train_args(tree, tiny_backbone, tmp_path / "ckpt", "--num-workers", "2", "--epochs", "1",
                                             "--max-bad-fraction", "0.2"), cwd=tmp_path))
    history = load(tmp_path / "ckpt" / rps.LAST_NAME)["history"]
    assert [m["skipped_train"] for m in history] == [1], result.stdout[-2000:]
    assert "bomb.png" in result.stdout + result.stderr


# =========================================================================== 8. both CPU backbone paths

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_backbone_tokens_in_float32_and_bf16_match(tiny_backbone, dtype):
    pixels = clip_pixels(2, seed=3)
    reference, _ = rps.FrozenCLIPBlocks(tiny_backbone, dtype=torch.float32)(pixels)
    tokens, _ = rps.FrozenCLIPBlocks(tiny_backbone, dtype=dtype)(pixels)
    assert tokens.shape == reference.shape and torch.isfinite(tokens.float()).all()
    tolerance = 0 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(tokens.float(), reference, rtol=tolerance, atol=tolerance)
    if dtype == torch.bfloat16:  # really computed in bf16, not silently in float32
        assert not torch.equal(tokens.float(), reference)


# =========================================================================== 9. SupCon temperature, resume state

@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_a_training_step_uses_supcon_temperature(tree, make_cfg, temperature):
    # Dropout 0 and a fixed batch: the features a second forward gives are those the step's loss saw.
    cfg = make_cfg(DATA_DIR=str(tree), DROPOUT=0.0, SUPCON_TEMPERATURE=temperature)
    torch.manual_seed(0)
    model = rps.RINEPlusSSCA(cfg).train()
    optimizer = rps.make_optimizer(model, cfg)
    batch = one_batch(tree, cfg)
    learner = rps.Learner(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), None)
    _, supcon, _ = rps.training_step(learner, batch, cfg)
    with torch.no_grad():
        _, features = model(rps.normalise_uint8(batch.pixels), None)
    expected = rps.supervised_contrastive_loss(features, batch.labels, temperature)
    other = rps.supervised_contrastive_loss(features, batch.labels, 0.3)
    assert supcon.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(supcon.item() - other.item()) > 1e-3  # the temperature matters for these features


def test_resume_refuses_a_last_checkpoint_with_missing_weights(trained, tmp_path):
    checkpoint = load(trained["last"])
    del checkpoint["model"]["classifier.weight"]
    broken = tmp_path / rps.LAST_NAME
    torch.save(checkpoint, broken)
    cfg = trained["cfg"]
    model = rps.RINEPlusSSCA(cfg)
    with pytest.raises(rps.UserError, match=r"does not match this model \(missing \['classifier.weight'\]"):
        rps.restore_last(broken, cfg, model, rps.make_optimizer(model, cfg), torch.amp.GradScaler("cpu", enabled=False))


def test_a_second_stop_signal_inside_the_update_waits_for_its_end():
    with rps.GracefulStop() as stop:
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            with stop.weights_and_position_together():
                signal.raise_signal(signal.SIGINT)  # held: no KeyboardInterrupt here
                reached_the_end = True
        assert reached_the_end


def test_a_second_ctrl_c_right_after_a_weight_update_saves_the_position_of_those_weights(tree, tiny_backbone,
                                                                                       tmp_path, monkeypatch):
    # Two Ctrl-C arrive right after the 2nd optimizer step; the saved resume step must count that step:
    # Adam's own step counter in the saved optimizer state says how many updates the weights have had.
    cfg = small_config(tiny_backbone, DATA_DIR=str(tree), CHECKPOINT_DIR=str(tmp_path / "run"), EPOCHS=1, BATCH_SIZE=4)
    real_step, calls = torch.optim.Adam.step, [0]

    def step_then_two_ctrl_c(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_two_ctrl_c)
    with pytest.raises(rps.RunInterrupted, match="epoch 1, step 2"):
        rps.train(cfg)
    last = load(tmp_path / "run" / rps.LAST_NAME)
    adam_steps = {float(state["step"]) for state in last["resume"]["optimizer"]["state"].values()}
    assert adam_steps == {2.0}
    assert (last["resume"]["epoch"], last["resume"]["step"]) == (1, 2)


def test_resuming_a_finished_run_says_there_is_nothing_left_to_do(trained, tmp_path, capsys):
    folder = shutil.copytree(Path(trained["cfg"].CHECKPOINT_DIR), tmp_path / "ckpt")  # the shared run stays as it is
    cfg = small_config(trained["cfg"].CLIP_MODEL, **{**vars(trained["cfg"]), "RESUME": True,
                                                     "CHECKPOINT_DIR": str(folder)})
    before = load(folder / rps.LAST_NAME)
    rps.train(cfg)
    out = capsys.readouterr().out
    assert f"nothing left to do: the run in {cfg.CHECKPOINT_DIR} finished its {cfg.EPOCHS} epoch(s)" in out, out
    after = load(folder / rps.LAST_NAME)
    assert after["epoch"] == before["epoch"] and all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])



def test_resuming_with_other_settings_says_which_and_goes_on(trained, tmp_path, capsys):
    # The README asks for the same options as before; a changed batch size or learning rate is named, once.
    folder = shutil.copytree(Path(trained["cfg"].CHECKPOINT_DIR), tmp_path / "ckpt")
    cfg = small_config(trained["cfg"].CLIP_MODEL, **{**vars(trained["cfg"]), "RESUME": True, "CHECKPOINT_DIR": str(folder),
                                                     "BATCH_SIZE": trained["cfg"].BATCH_SIZE * 2, "LR": 0.01,
                                                     "NUM_WORKERS": 1})
    rps.train(cfg)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: --resume")]
    assert len(warnings) == 1, warnings
    assert f"BATCH_SIZE {trained['cfg'].BATCH_SIZE} -> {cfg.BATCH_SIZE}" in warnings[0] and "LR 0.001 -> 0.01" in warnings[0]
    assert "NUM_WORKERS" not in warnings[0] and "CHECKPOINT_DIR" not in warnings[0]  # where and how fast: no word
