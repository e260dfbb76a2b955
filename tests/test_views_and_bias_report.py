"""No shortcuts: the DCT grid is the same in training and testing, small images get no black
border, augmentation of large images costs a window not the whole image, the DCT's log
compresses, and check-data and training warn when real and fake differ in format or size."""

import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rine_plus_ssca as rps
from conftest import run_main, write_demo_tree
from rine_plus_ssca_tools import bias_report


def coordinate_image(width, height):
    """An image whose pixels say where they are: R = x mod 256, G = y mod 256, B = the 256s of x and y."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def origin_of(view):
    """(x, y) in the image of a crop's top-left pixel, from a coordinate_image crop [3,S,S] (any flip)."""
    view = np.asarray(view).astype(int)
    flipped = (view[0, 0, 1] - view[0, 0, 0]) % 256 != 1  # x runs backwards along a row
    column = view.shape[2] - 1 if flipped else 0
    red, green, blue = view[:, 0, column]
    return (blue // 16) * 256 + red, (blue % 16) * 256 + green


def no_augmentation_cfg(**overrides):
    cfg = rps.default_config()
    cfg.BLUR_PROB, cfg.JPEG_PROB = 0.0, 0.0
    cfg.__dict__.update(overrides)
    return cfg


# --------------------------------------------------------------------------- the 8x8 grid

@pytest.mark.parametrize("width,height", [(701, 603), (256, 256), (517, 1030)])
def test_training_and_test_crops_start_on_the_same_8_pixel_grid(width, height):
    cfg = no_augmentation_cfg()
    image = coordinate_image(width, height)
    augment = rps.build_transform(cfg, train=True)
    train_origins = [origin_of(augment(image, torch.Generator().manual_seed(seed))) for seed in range(300)]
    test_origin = origin_of(rps.build_transform(cfg, train=False)(image))
    tencrop_origins = [origin_of(crop) for crop in rps.build_transform(cfg, train=False, tencrop=True)(image)]

    def offsets(origins):
        return Counter((x % 8, y % 8) for x, y in origins)

    # The policy: every crop origin on the image's 8-pixel grid, in training and in testing alike.
    assert offsets(train_origins) == {(0, 0): len(train_origins)}
    assert offsets([test_origin]) == {(0, 0): 1}
    assert offsets(tencrop_origins) == {(0, 0): 10}
    # ... and the training crops still move around over the image's grid positions.
    for used, side in (({x for x, _ in train_origins}, width), ({y for _, y in train_origins}, height)):
        positions = set(range(0, side - 224 + 1, 8))
        assert used <= positions and len(used) >= min(len(positions), 40)
    # The centre crop is as central as the grid allows; the ten crops reach the far corners.
    assert 0 <= (width - 224) / 2 - test_origin[0] < 8 and 0 <= (height - 224) / 2 - test_origin[1] < 8
    assert max(x for x, _ in tencrop_origins) > width - 224 - 8 and max(y for _, y in tencrop_origins) > height - 224 - 8


def test_a_flipped_training_view_keeps_the_grid():
    cfg = no_augmentation_cfg()
    image = coordinate_image(300, 300)
    augment = rps.TrainAugment(cfg)
    flips = set()
    for seed in range(40):
        view = augment(image, torch.Generator().manual_seed(seed)).astype(int)
        flipped = (view[0, 0, 1] - view[0, 0, 0]) % 256 != 1
        flips.add(flipped)
        # Each 8-pixel block of the view holds one 8-pixel block of the image (mirrored when flipped).
        block_starts = view[0, 0, 0::8] if not flipped else view[0, 0, 7::8]
        assert (block_starts % 8 == 0).all()
    assert flips == {True, False}


# --------------------------------------------------------------------------- small images

def test_small_images_are_mirror_padded_the_same_way_in_training_and_testing():
    cfg = no_augmentation_cfg()
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(50, 200, (100, 130, 3), dtype=np.uint8))  # 130 x 100
    test_view = rps.build_transform(cfg, train=False)(small).numpy()
    tencrops = rps.build_transform(cfg, train=False, tencrop=True)(small).numpy()
    augment = rps.build_transform(cfg, train=True)
    train_views = [augment(small, torch.Generator().manual_seed(seed)) for seed in range(20)]
    for view in [test_view, *tencrops, *train_views]:
        assert view.shape == (3, 224, 224)
        assert view.min() >= 50, "a black border that only small images have"
    # The crop covers the whole padded image: training sees exactly the test view (or its mirror).
    for view in train_views:
        assert np.array_equal(view, test_view) or np.array_equal(view, test_view[:, :, ::-1])
    # The image itself sits at a multiple of 8 from the crop's corner, so its 8-pixel grid is the crop's.
    original = np.asarray(small).transpose(2, 0, 1)
    left, top = rps.PadToAtLeast.left_top(224, 130, 100)
    assert top % 8 == 0 and left % 8 == 0
    assert np.array_equal(test_view[:, top:top + 100, left:left + 130], original)


def test_a_very_small_image_is_padded_without_black():
    image = Image.new("RGB", (3, 2), (120, 30, 200))
    view = rps.build_transform(no_augmentation_cfg(), train=False)(image).numpy()
    assert view.shape == (3, 224, 224)
    assert (view[0] == 120).all() and (view[1] == 30).all() and (view[2] == 200).all()


def image_blocks_and_mirrors(pixels):
    """Every 8x8 block of an [H,W,3] image on its own grid, as it is and mirrored in x, y or both (as bytes)."""
    blocks = set()
    for y in range(0, pixels.shape[0] - 7, 8):
        for x in range(0, pixels.shape[1] - 7, 8):
            block = pixels[y:y + 8, x:x + 8]
            blocks |= {block.tobytes(), block[::-1].tobytes(), block[:, ::-1].tobytes(), block[::-1, ::-1].tobytes()}
    return blocks


@pytest.mark.parametrize("width,height", [(128, 128), (96, 64)])
def test_mirror_padding_copies_whole_8x8_blocks_of_a_small_image(width, height):
    # GenImage's 128 px BigGAN fakes: each 8x8 block of the padded crop must be one block of the image
    # (or its mirror). Padding that leaves out the edge pixel ("reflect") shifts the mirror by one pixel,
    # so its blocks straddle two image blocks and give small images a DCT signature of their own.
    small = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    view = rps.build_transform(no_augmentation_cfg(), train=False)(Image.fromarray(small)).numpy().transpose(1, 2, 0)
    allowed = image_blocks_and_mirrors(small)
    foreign = [(y, x) for y in range(0, 224, 8) for x in range(0, 224, 8)
               if view[y:y + 8, x:x + 8].tobytes() not in allowed]
    assert foreign == []
    left, top = rps.PadToAtLeast.left_top(224, width, height)
    assert np.array_equal(view[top:top + height, left:left + width], small)  # the image itself is in the crop


# --------------------------------------------------------------------------- augmentation window

@pytest.mark.parametrize("size", [256, 700])
def test_window_augmentation_equals_whole_image_augmentation(size):
    # Blur and JPEG on a window around the crop give the crop of the blurred, re-encoded whole image:
    # for 256 px images (the window is the image) and for larger ones (the window's margin covers
    # the blur and the JPEG blocks the crop touches).
    cfg = rps.default_config()
    cfg.BLUR_PROB = cfg.JPEG_PROB = 1.0
    rng = np.random.default_rng(size)
    image = Image.fromarray(rps.make_demo_image(rng, fake=False, size=size))
    window, whole = rps.TrainAugment(cfg), rps.TrainAugment(cfg, whole_image=True)
    assert window.margin % rps.JPEG_MCU == 0 and window.margin >= 3 * cfg.BLUR_SIGMA_MAX + rps.JPEG_MCU
    views = []
    for seed in range(25):
        a = window(image, torch.Generator().manual_seed(seed))
        b = whole(image, torch.Generator().manual_seed(seed))
        assert np.array_equal(a, b), seed
        views.append(a)
    # Not trivially equal: the views differ from one another and from the untouched crop.
    assert len({view.tobytes() for view in views}) == len(views)


def test_default_augmentation_views_are_unchanged_by_the_window_on_256_px_images():
    cfg = rps.default_config()  # the default probabilities: some views blurred, some re-encoded, some neither
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rps.make_demo_image(rng, fake=bool(i % 2), size=256)) for i in range(4)]
    window, whole = rps.TrainAugment(cfg), rps.TrainAugment(cfg, whole_image=True)
    for image in images:
        for seed in range(10):
            assert np.array_equal(window(image, torch.Generator().manual_seed(seed)),
                                  whole(image, torch.Generator().manual_seed(seed)))


# --------------------------------------------------------------------------- training recipes

def recipe_draws(recipe, n, width=256, height=256, seed=0):
    augment = rps.TrainAugment(no_augmentation_cfg(TRAIN_RECIPE=recipe, BLUR_PROB=0.5, JPEG_PROB=0.5,
                                                   BLUR_SIGMA_MAX=3.0, JPEG_QUALITY_MIN=30))
    generator = torch.Generator().manual_seed(seed)
    return [augment.draw(width, height, generator) for _ in range(n)]


def test_rine_recipe_draws_what_rines_data_augment_draws():
    # RINE's data_augment: blur with p 0.5, sigma ~ U[0, 3]; independently JPEG with p 0.5 at quality 30 or
    # 100; then RandomCrop(224) at any position and a flip with p 0.5. 20,000 draws: every one of the
    # 33 x 33 = 1,089 crop origins of a 256 px image then appears except with probability
    # 1089 * (1 - 1/1089)^20000 ~ 1e-5 (with 10,000 draws it would be ~0.1).
    n = 20_000
    draws = recipe_draws("rine", n)

    def near(count, p):  # within 5 binomial standard deviations of n * p
        return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p))

    qualities = Counter(d.quality for d in draws)
    assert set(qualities) == {None, 30, 100}
    assert near(qualities[30], 0.25) and near(qualities[100], 0.25) and near(qualities[None], 0.5)
    sigmas = np.array([d.sigma for d in draws if d.sigma > 0])
    assert near(len(sigmas), 0.5)
    assert near(sum(d.sigma > 0 and d.quality is not None for d in draws), 0.25)  # blur and JPEG independent
    assert sigmas.min() >= 0 and sigmas.max() <= 3
    for count in np.histogram(sigmas, bins=6, range=(0, 3))[0]:  # uniform: a sixth of the blurred views per bin
        assert abs(count - len(sigmas) / 6) <= 5 * math.sqrt(len(sigmas) * (1 / 6) * (5 / 6))
    assert near(sum(d.flip for d in draws), 0.5)
    origins = Counter((d.left, d.top) for d in draws)
    assert set(origins) == {(x, y) for x in range(33) for y in range(33)}
    for axis in (0, 1):  # each of the 33 positions a 33rd of the time, in x and in y
        for count in Counter((d.left, d.top)[axis] for d in draws).values():
            assert near(count, 1 / 33)


def test_grid_recipe_draws_crops_on_the_grid_and_any_quality_from_30_to_100():
    draws = recipe_draws("grid", 5_000)
    assert {(d.left, d.top) for d in draws} == {(x, y) for x in range(0, 33, 8) for y in range(0, 33, 8)}
    assert {d.quality for d in draws} == {None, *range(30, 101)}


def test_rine_recipe_views_crop_where_drawn_and_off_the_grid():
    cfg = no_augmentation_cfg(TRAIN_RECIPE="rine")
    image = coordinate_image(300, 280)
    augment = rps.build_transform(cfg, train=True)
    origins = []
    for seed in range(200):
        view = augment(image, torch.Generator().manual_seed(seed))
        drawn = augment.draw(300, 280, torch.Generator().manual_seed(seed))
        assert origin_of(view) == (drawn.left, drawn.top)
        origins.append(origin_of(view))
    assert len({(x % 8, y % 8) for x, y in origins}) > 40  # of 64 offsets against the grid


def test_rine_recipe_window_augmentation_equals_whole_image_augmentation():
    cfg = rps.default_config()
    cfg.TRAIN_RECIPE, cfg.BLUR_PROB, cfg.JPEG_PROB = "rine", 1.0, 1.0
    image = Image.fromarray(rps.make_demo_image(np.random.default_rng(3), fake=True, size=700))
    window, whole = rps.TrainAugment(cfg), rps.TrainAugment(cfg, whole_image=True)
    for seed in range(8):
        view = window.draw(700, 700, torch.Generator().manual_seed(seed))
        assert view.quality in (30, 100)
        assert np.array_equal(window.apply(image, view), whole.apply(image, view)), seed


# --------------------------------------------------------------------------- the DCT's scale

def high_frequency_magnitudes(dct, pixels):
    """|DCT coefficient| as BlockDCT sees it, for frequencies u + v >= 8, from its output (log1p then a
    fresh BatchNorm in eval mode, the identity up to sqrt(1 + eps))."""
    dct.eval()
    with torch.no_grad():
        magnitudes = torch.expm1(dct(pixels).double() * math.sqrt(1 + dct.norm.eps))
    u, v = np.divmod(np.arange(64), 8)
    high = torch.from_numpy(np.tile(u + v >= 8, 3))
    return magnitudes[:, high]


def test_block_dct_takes_the_dct_of_0_255_pixels_where_the_log_compresses():
    rng = np.random.default_rng(0)
    image = rps.make_demo_image(rng, fake=False, size=224)
    uint8 = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    magnitudes = high_frequency_magnitudes(rps.BlockDCT(), rps.normalise_uint8(uint8))
    # The same coefficients computed directly from the 0-255 pixels.
    blocks = uint8.double().unfold(2, 8, 8).unfold(3, 8, 8)  # [1,3,28,28,8,8]
    basis = rps.dct_matrix(8).double()
    direct = torch.einsum("ui,bchwij,vj->bcuvhw", basis, blocks, basis).abs().reshape(1, 192, 28, 28)
    u, v = np.divmod(np.arange(64), 8)
    np.testing.assert_allclose(magnitudes.numpy(), direct[:, torch.from_numpy(np.tile(u + v >= 8, 3))].numpy(),
                               rtol=1e-3, atol=1e-3)
    # Where log1p is nearly linear (|c| < 0.1: log1p(c)/c > 0.95) lies a small minority of the
    # high-frequency inputs; on CLIP-normalised pixels it was most of them.
    assert (magnitudes < 0.1).double().mean() < 0.2
    assert magnitudes.median() > 1.0


# --------------------------------------------------------------------------- bias report

@pytest.mark.parametrize("quality", [30, 50, 75, 90, 95, 100])
def test_jpeg_quality_is_estimated_from_the_quantisation_tables(quality):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(quality).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(
        buffer, format="JPEG", quality=quality)
    header = bias_report.image_header(buffer)
    assert header["format"] == "JPEG" and (header["width"], header["height"]) == (48, 32)
    assert header["jpeg_quality"] == quality


def write_biased_tree(root, n=12, real_format="JPEG", real_size=288, fake_size=128):
    """train/gan/0_real: real_size px JPEGs (quality 90); train/gan/1_fake: fake_size px PNGs."""
    rng = np.random.default_rng(0)
    for folder, fake, size, image_format in (("0_real", False, real_size, real_format), ("1_fake", True, fake_size, "PNG")):
        target = Path(root) / "train" / "gan" / folder
        target.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = Image.fromarray(rps.make_demo_image(rng, fake, "bilinear", size))
            suffix = ".jpg" if image_format == "JPEG" else ".png"
            image.save(target / f"{i:03d}{suffix}", format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return Path(root)


def shortcut_lines(text):
    return [line for line in text.splitlines() if "warning" in line and "the detector can learn" in line]


def test_check_data_warns_when_reals_are_large_jpegs_and_fakes_small_pngs(tmp_path):
    root = write_biased_tree(tmp_path / "data")
    result = run_main(["check-data", "--data", root / "train", "--workers", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = shortcut_lines(result.stdout)
    assert any("100% of real images are JPEG, 0% of fakes" in line and "file format" in line for line in lines), lines
    assert any("smaller than the 224 px crop" in line and "100% of fakes" in line for line in lines), lines
    assert any("288 px, fakes 128 px" in line for line in lines), lines
    # The table shows the numbers behind the warnings, per label and per generator folder.
    table = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines()
             if line.startswith(("real ", "fake ", "gan real", "gan fake"))}
    assert set(table) == {"real", "fake", "gan real", "gan fake"}
    assert "JPEG 100%" in table["real"] and "PNG 100%" in table["fake"]
    assert " 90 " in table["real"] + " " and "128/128/128" in table["fake"]


def test_check_data_and_training_stay_silent_on_unbiased_data(tmp_path, make_cfg, capsys):
    root = write_demo_tree(tmp_path / "data", {"train": {"nearest": 6, "bilinear": 6}})
    result = run_main(["check-data", "--data", root / "train", "--workers", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "possible shortcuts (real and fake differ): 0" in result.stdout
    assert shortcut_lines(result.stdout) == []
    rps.prepare_splits(make_cfg(DATA_DIR=str(root)))  # what training runs before the first epoch
    assert "shortcut" not in capsys.readouterr().out


@pytest.mark.slow  # trains, in this process
def test_training_warns_before_the_first_epoch(tmp_path, tiny_backbone):
    root = write_biased_tree(tmp_path / "data", n=8)
    result = run_main(["--data-dir", root, "--clip-model", tiny_backbone, "--device", "cpu", "--num-workers", "0",
                       "--proj-dim", "16", "--spec-channels", "8", "--fusion-dim", "16", "--fusion-heads", "2",
                       "--batch-size", "8", "--epochs", "1", "--checkpoint-dir", "ckpt"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = shortcut_lines(result.stdout)
    assert any("real images are JPEG" in line for line in lines), result.stdout[-3000:]
    assert any("smaller than the 224 px crop" in line for line in lines), result.stdout[-3000:]
    first_warning = result.stdout.index("possible shortcut")
    assert first_warning < result.stdout.index("epoch 1:")


def test_an_image_as_large_as_the_crop_is_not_under_it():
    def header(width, height):
        return dict(width=width, height=height, format="PNG", mode="RGB", jpeg_quality=None)

    summary = bias_report.header_summary([header(224, 224), header(223, 300), header(300, 224), header(400, 400)], 224)
    assert summary["below_crop"] == 0.25  # only the 223 px side is under a 224 px crop
    real = bias_report.header_summary([header(224, 224)] * 6, 224)
    fake = bias_report.header_summary([header(256, 256)] * 6, 224)
    assert real["below_crop"] == 0 and not any("smaller than" in line for line in bias_report.shortcut_warnings(real, fake, 224))


def test_bias_warning_for_jpeg_quality_and_colour_mode():
    def headers(n, **values):
        return [dict(width=256, height=256, format="JPEG", mode="RGB", jpeg_quality=90, **{}) | values for _ in range(n)]

    real = bias_report.header_summary(headers(10, jpeg_quality=95), 224)
    fake = bias_report.header_summary(headers(10, jpeg_quality=70, mode="L"), 224)
    found = bias_report.shortcut_warnings(real, fake, 224)
    assert any("median quality 95, fake JPEGs 70" in line for line in found), found
    assert any("colour mode" in line for line in found), found
    assert bias_report.shortcut_warnings(real, bias_report.header_summary(headers(7, jpeg_quality=92), 224), 224) == []


# --------------------------------------------------------------------------- benchmark scripts

def run_benchmark(name, args, cwd):
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / name
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_augment_cost_and_dct_scale_benchmarks_print_their_figures(tmp_path):
    result = run_benchmark("augment_cost.py", ["--sizes", "256,400", "--views", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("256 px", "400 px"))]
    assert len(rows) == 2 and all(len(row) == 9 for row in rows), result.stdout
    assert list(tmp_path.iterdir()) == []  # its JPEGs lived in a temporary folder

    write_demo_tree(tmp_path / "demo", {"test": {"nearest": 2}})
    result = run_benchmark("dct_scale.py", ["--data", tmp_path / "demo" / "test"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    shares = {line.split(":")[0].strip(): float(line.split("for ")[1].split("%")[0])
              for line in result.stdout.splitlines() if "|c| < 0.1" in line}
    assert set(shares) == {"CLIP-normalised", "0-255"} and shares["0-255"] < shares["CLIP-normalised"]


def test_jpeg_encoders_benchmark_compares_opencv_and_pillow_per_image_and_quality(tmp_path):
    Image.fromarray(rps.make_demo_image(np.random.default_rng(0), True, "bilinear", 64)).save(tmp_path / "a.png")
    result = run_benchmark("jpeg_encoders.py", ["--images", tmp_path / "a.png", "--qualities", "30", "100"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("a.png")]
    assert [row[1] for row in rows] == ["30", "100"] and all(row[2] in ("True", "False") for row in rows), result.stdout
    # Each row's pixel difference is what the two encoders give on that image, computed here again.
    import cv2

    pixels = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    for row in rows:
        quality = int(row[1])
        ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(pixels[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
        by_opencv = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1].astype(int)
        by_pillow = np.asarray(rps.jpeg_reencode(Image.fromarray(pixels), quality)).astype(int)
        assert float(row[3]) == pytest.approx(np.abs(by_opencv - by_pillow).mean(), abs=6e-4), (row, result.stdout)
