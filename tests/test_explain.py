"""Heatmaps (`explain`, `predict --explain`): what they find, how local they are, and whether they are faithful.

Demo photos with a square from a demo fake (1/9 of the crop) pasted at a random place: with the demo's
checkpoint the map's maximum must fall inside the square for at least 40 of 50 images (a random point: 11%;
an edge filter finds these smooth squares too, see benchmarks/localisation.py), and a head of the same shape
that learned nothing must not find it. The matched splices (squares re-noised to the photo's high-frequency
energy) are checked for that energy; the pixel scores by hand; a spectral token's reach across the crop and
the windows map's locality; and a deletion test: giving the photo's pixels back to the map's highest cells
must lower the demo model's logit more than random cells do.
"""

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import rine_plus_ssca as rps
from rine_plus_ssca_tools import heatmaps

N_SPLICED = 50


def hits(model, images):
    """How many maps peak inside their square."""
    count = 0
    for image, (left, top, side) in images:
        x, y = heatmaps.peak_of(heatmaps.explain(model, Image.fromarray(image))[0])
        count += left <= x < left + side and top <= y < top + side
    return count


@pytest.fixture(scope="module")
def demo_model(demo):
    cwd, result = demo
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return rps.load_detector(cwd / "checkpoints/demo" / rps.BEST_NAME, device="cpu")


@pytest.fixture(scope="module")
def spliced():
    rng = np.random.default_rng(0)
    return [heatmaps.make_spliced_demo_image(rng, "bilinear") for _ in range(N_SPLICED)]


def test_spliced_squares_are_a_ninth_of_the_crop_and_inside_it(spliced):
    image, (left, top, side) = spliced[0]
    assert image.shape == (256, 256, 3) and side == 75  # 75^2 / 224^2 = 0.112
    origin = 16  # the centre crop's origin on the 8-pixel grid
    real_again = rps.make_demo_image(np.random.default_rng(0), False)
    changed = np.argwhere((image != real_again).any(axis=2))
    assert changed.min(axis=0).tolist() >= [origin + top, origin + left]
    assert changed.max(axis=0).tolist() <= [origin + top + side - 1, origin + left + side - 1]
    assert all(0 <= left <= 224 - side and 0 <= top <= 224 - side for _, (left, top, side) in spliced)


def test_heatmaps_find_the_generated_square_in_at_least_80_percent_of_50_images(demo_model, spliced):
    found = hits(demo_model, spliced)
    print(f"heatmap maximum inside the square: {found}/{N_SPLICED}")
    assert found >= 0.8 * N_SPLICED, f"{found}/{N_SPLICED}"


def test_an_untrained_head_does_not_find_the_square(demo, demo_model, spliced):
    """The sanity check of Adebayo et al. (2018): same architecture and backbone, weights never trained."""
    cwd, _ = demo
    cfg = rps.default_config()
    cfg.__dict__.update(demo_model.config)
    cfg.CLIP_MODEL = str(cwd / cfg.CLIP_MODEL)
    torch.manual_seed(0)
    untrained = rps.build_model(cfg, torch.device("cpu")).eval()
    found = hits(untrained, spliced[:25])
    assert found <= 0.3 * 25, f"an untrained head found {found}/25: the map does not depend on training"


def test_the_map_is_the_head_on_a_spectral_map_made_of_one_token(make_cfg):
    """local_logits takes the 1x1 shortcut; it must equal the definition: every position replaced by the token."""
    for overrides in (dict(), dict(FUSION="concat"), dict(SPECTRAL_INPUT="clip_patches", PATCH_BLOCK=2)):
        torch.manual_seed(0)
        model = rps.build_model(make_cfg(**overrides), torch.device("cpu")).eval()
        pixels = torch.randn(1, 3, 224, 224)
        logit, local = model.local_logits(pixels)
        with torch.no_grad():
            assert torch.allclose(logit, model(pixels)[0], atol=1e-5), overrides
            z_clip, block_tokens, spectral_map = model.branches(pixels)
            height, width = spectral_map.shape[-2:]
            assert local.shape == (height, width), overrides
            for row, column in ((0, 0), (height // 2, width - 1), (height - 1, 3)):
                uniform = spectral_map[:, :, row:row + 1, column:column + 1].expand_as(spectral_map)
                expected = model.classifier(model.fused_representation(z_clip, block_tokens, uniform))
                assert torch.allclose(local[row, column], expected.squeeze(), atol=1e-4), (overrides, row, column)
        assert local.std() > 0  # positions differ: the map says something about places


def test_without_the_spectral_branch_each_cell_is_the_mean_over_the_windows_covering_it(make_cfg):
    torch.manual_seed(0)
    model = rps.build_model(make_cfg(USE_SPECTRAL=False), torch.device("cpu")).eval()
    crop = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    window, stride = heatmaps.EXPLAIN_WINDOW, heatmaps.EXPLAIN_STRIDE
    assert (window, stride) == (32, 16)
    tiled = heatmaps.mirror_tiled(crop[:32, :32], 224)
    assert tiled.shape == (224, 224, 3)
    np.testing.assert_array_equal(tiled[:32, :32], crop[:32, :32])
    np.testing.assert_array_equal(tiled[:32, 32:64], crop[:32, :32][:, ::-1])  # mirrored, so no seam
    np.testing.assert_array_equal(tiled[32:64, :32], crop[:32, :32][::-1])

    cells = heatmaps.window_logits(model, crop, batch_size=7)
    assert cells.shape == (28, 28)

    def logit_of(top, left):
        pixels = rps.normalise_uint8(torch.from_numpy(heatmaps.mirror_tiled(crop[top:top + 32, left:left + 32], 224)).permute(2, 0, 1)[None])
        with torch.no_grad():
            return model(pixels)[0].item()

    assert cells[0, 0].item() == pytest.approx(logit_of(0, 0), abs=1e-5)  # only the first window covers it
    # Cell (3, 5) covers pixels 24-31 x 40-47: the windows starting at rows 0 and 16, columns 16 and 32.
    expected = np.mean([logit_of(top, left) for top in (0, 16) for left in (16, 32)])
    assert cells[3, 5].item() == pytest.approx(expected, abs=1e-5)

    explanation = heatmaps.explain(model, Image.fromarray(crop))[0]
    assert explanation.method == "windows"
    np.testing.assert_allclose(explanation.local_logits, cells.numpy(), atol=1e-5)


def test_explanations_read_on_the_scale_of_p_fake(make_cfg):
    torch.manual_seed(0)
    model = rps.build_model(make_cfg(), torch.device("cpu")).eval()
    images = [Image.fromarray(rps.make_demo_image(np.random.default_rng(i), i % 2 == 1, size=260)) for i in range(3)]
    explanations = heatmaps.explain(model, images)
    np.testing.assert_allclose([e.p_fake for e in explanations], rps.predict(model, images), atol=1e-5)
    for explanation, image in zip(explanations, images):
        assert explanation.image is None and explanation.method == "spectral tokens"
        np.testing.assert_array_equal(explanation.crop, np.asarray(rps.CentreCrop(224)(image)))
        np.testing.assert_allclose(explanation.local_p_fake, 1 / (1 + np.exp(-explanation.local_logits.astype(np.float64))),
                                   rtol=1e-6)


def test_the_map_reads_on_the_p_fake_scale_at_a_temperature_other_than_one(make_cfg):
    torch.manual_seed(0)
    model = rps.build_model(make_cfg(), torch.device("cpu")).eval()
    model.temperature = 2.0  # a calibrated checkpoint's, set by hand
    images = [Image.fromarray(rps.make_demo_image(np.random.default_rng(i), i % 2 == 1, size=260)) for i in range(2)]
    explanations = heatmaps.explain(model, images)
    np.testing.assert_allclose([e.p_fake for e in explanations], rps.predict(model, images), atol=1e-5)
    for explanation in explanations:
        local = explanation.local_logits.astype(np.float64)
        np.testing.assert_allclose(explanation.local_p_fake, 1 / (1 + np.exp(-local / 2.0)), rtol=1e-6)
        assert np.abs(1 / (1 + np.exp(-local)) - 1 / (1 + np.exp(-local / 2.0))).max() > 1e-3  # T = 1 would show


def test_drawing_makes_a_two_panel_figure_without_touching_the_pyplot_backend(make_cfg, tmp_path):
    torch.manual_seed(0)
    model = rps.build_model(make_cfg(), torch.device("cpu")).eval()
    backend = matplotlib.get_backend()
    explanation = heatmaps.explain(model, Image.fromarray(rps.make_demo_image(np.random.default_rng(0), True)))[0]
    figure = heatmaps.draw_explanation(explanation, threshold=0.5)
    assert len([axis for axis in figure.axes if axis.images]) == 2
    assert f"P(fake) {explanation.p_fake:.3f}" in figure._suptitle.get_text()
    figure.savefig(tmp_path / "map.png")
    assert Image.open(tmp_path / "map.png").size[0] > 400
    assert matplotlib.get_backend() == backend


def test_picture_names_are_unique_and_readable():
    assert heatmaps.explanation_file_names(["a/x.png", "b/x.png", "c/y.jpg"]) == ["a_x_png.png", "b_x_png.png", "c_y_jpg.png"]
    assert heatmaps.explanation_file_names(["mine/gray.png", "mine/tiny.png"]) == ["gray_png.png", "tiny_png.png"]
    assert heatmaps.explanation_file_names(["/abs/p.png"]) == ["p_png.png"]
    # The same name with another extension in one folder: each picture still says which file it is.
    assert heatmaps.explanation_file_names(["d/000.png", "d/000.jpg"]) == ["000_png.png", "000_jpg.png"]
    names = heatmaps.explanation_file_names(["d/x.png", "d/x.png"])  # the same path twice
    assert len(set(names)) == 2 and all(name.endswith(".png") for name in names)


# --------------------------------------------------------------------------- the evidence behind the map

def test_a_matched_splice_has_the_high_frequency_energy_of_the_photo_it_covers():
    """make_matched_splice re-noises the square: its mean squared Laplacian (colour and grey) is the photo's there,
    where the square as cut is several times smoother (what let an edge filter find it)."""
    for generator in ("bilinear", "nearest", "transposed_conv"):
        image, photo, (left, top, side) = heatmaps.make_matched_splice(np.random.default_rng(3), generator)
        plain, _ = heatmaps.make_spliced_demo_image(np.random.default_rng(3), generator)
        rows, columns = slice(16 + top, 16 + top + side), slice(16 + left, 16 + left + side)

        def energy(pixels, grey=False):
            pixels = pixels[rows, columns].astype(np.float64)
            return float((heatmaps.laplacian(pixels.mean(axis=2) if grey else pixels) ** 2).mean())

        for grey in (False, True):
            assert energy(image, grey) == pytest.approx(energy(photo, grey), rel=0.15), (generator, grey)
            assert energy(plain, grey) < 0.7 * energy(photo, grey), (generator, grey)
        outside = np.ones(image.shape[:2], dtype=bool)
        outside[rows, columns] = False
        np.testing.assert_array_equal(image[outside], photo[outside])  # only the square changed
        np.testing.assert_array_equal(plain[outside], photo[outside])


def test_localisation_scores_by_hand():
    box = (8, 16, 24)  # left, top, side on a 64 x 64 crop of 8 x 8 cells
    inside = np.zeros((8, 8))
    inside[2:5, 1:4] = 1.0  # exactly the square's cells
    scores = heatmaps.localisation_scores(inside, box, 64, 64)
    assert scores == {"pointing": 1.0, "pixel_auc": 1.0, "mass": 1.0}
    assert heatmaps.localisation_scores(1 - inside, box, 64, 64) == {"pointing": 0.0, "pixel_auc": 0.0, "mass": 0.0}
    flat = heatmaps.localisation_scores(np.zeros((8, 8)), box, 64, 64)
    assert flat["pixel_auc"] == 0.5 and flat["mass"] == pytest.approx(24 * 24 / 64 ** 2)
    half = inside.copy()
    half[2:5, 1] = 0.0  # a third of the square's cells lost: 2/3 of its pixels above every other pixel
    assert heatmaps.localisation_scores(half, box, 64, 64)["pixel_auc"] == pytest.approx(1 - (1 / 3) / 2)


def test_a_spectral_token_reaches_across_the_image_and_a_window_cell_does_not(make_cfg):
    """SSCA's global frequency filter and spatial gate: the corner token's logit moves when only the opposite
    corner's pixels change (a gradient, measured). The windows map (explain(windows=True)) is local by
    construction: its corner cell keeps its value."""
    torch.manual_seed(0)
    model = rps.build_model(make_cfg(), torch.device("cpu")).eval()
    crop = rps.make_demo_image(np.random.default_rng(0), True, size=224)
    gradient = heatmaps.cell_gradient(model, rps.normalise_uint8(torch.from_numpy(crop).permute(2, 0, 1)[None]), 0, 0)
    assert gradient.shape == (224, 224) and gradient[-56:, -56:].sum() > 0
    assert heatmaps.reach(gradient.numpy(), 0, 0, 0.99) > 36  # beyond the "about 72x72 pixels" once estimated
    changed = crop.copy()
    changed[-64:, -64:] = 255 - changed[-64:, -64:]
    before, after = (heatmaps.explain(model, Image.fromarray(c))[0].local_logits for c in (crop, changed))
    assert abs(after[0, 0] - before[0, 0]) > 1e-6
    before, after = (heatmaps.explain(model, Image.fromarray(c), windows=True)[0].local_logits for c in (crop, changed))
    assert after[0, 0] == before[0, 0] and after[-1, -1] != before[-1, -1]


DELETION_MARGIN = 3  # the map's cells must lower the logit at least 3x as much as random cells do


def test_giving_the_photo_back_to_the_maps_highest_cells_lowers_the_logit_more_than_random_cells(demo_model):
    """Deletion test on the demo checkpoint: 10 photos with a bilinear square; the photo's pixels are given back to
    the 1/9 of the cells the map ranks highest, or to 1/9 chosen at random (3 draws). Measured: the logit falls by
    0.066 on average against 0.006 for random cells, larger in each of the 10 images. Small in absolute terms:
    8/9 of each image is real, and its P(fake) is near 0 before and after."""
    rng, chance = np.random.default_rng(0), np.random.default_rng(1)
    by_map, at_random = [], []
    for _ in range(10):
        image, photo, _ = heatmaps.splice(rng, "bilinear")
        explanation = heatmaps.explain(demo_model, Image.fromarray(image))[0]
        photo_crop = np.asarray(rps.CentreCrop(224)(Image.fromarray(photo)))
        logits = heatmaps.deletion_logits(demo_model, explanation.crop, photo_crop, explanation.local_logits, (0, 1 / 9))
        by_map.append(logits[0] - logits[1])
        random_drops = [np.subtract(*heatmaps.deletion_logits(demo_model, explanation.crop, photo_crop,
                                                              chance.random(explanation.local_logits.shape), (0, 1 / 9)))
                        for _ in range(3)]
        at_random.append(np.mean(random_drops))
    print(f"logit drop, map: {np.mean(by_map):.3f}, random cells: {np.mean(at_random):.3f}")
    assert np.mean(by_map) > DELETION_MARGIN * max(np.mean(at_random), 1e-3)
    assert sum(m > r for m, r in zip(by_map, at_random)) >= 8


def test_the_drawn_verdict_uses_the_threshold_predict_uses(make_cfg):
    image = Image.fromarray(rps.make_demo_image(np.random.default_rng(0), True))
    verdicts = {}
    for side in ("below", "above"):
        torch.manual_seed(0)
        model = rps.build_model(make_cfg(), torch.device("cpu")).eval()
        p_fake = heatmaps.explain(model, image)[0].p_fake
        # A THRESHOLD on either side of this image's P(fake), neither of them 0.5.
        model.config["THRESHOLD"] = p_fake / 2 if side == "below" else (1 + p_fake) / 2
        explanation = heatmaps.explain(model, image)[0]
        assert explanation.threshold == rps.decision_threshold(model)[0] == model.config["THRESHOLD"]
        verdicts[side] = heatmaps.draw_explanation(explanation)._suptitle.get_text()
    assert verdicts["below"].endswith(f"fake at threshold {p_fake / 2:g}"), verdicts
    assert verdicts["above"].endswith(f"real at threshold {(1 + p_fake) / 2:g}"), verdicts


@pytest.mark.parametrize("use_spectral", [True, False], ids=["spectral", "rine"])
def test_the_backbone_passes_an_explanation_costs_are_the_ones_announced(make_cfg, use_spectral):
    torch.manual_seed(0)
    model = rps.build_model(make_cfg(USE_SPECTRAL=use_spectral), torch.device("cpu")).eval()
    seen = []
    hook = model.backbone.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[0]))
    try:
        heatmaps.explain(model, Image.fromarray(rps.make_demo_image(np.random.default_rng(0), True)))
    finally:
        hook.remove()
    # Measured on the tiny backbone: images through the backbone for one explained image.
    assert sum(seen) == heatmaps.backbone_passes_per_image(model) == (1 if use_spectral else 1 + 13 * 13)
    note = heatmaps.cost_note(model, 2)
    assert note.startswith("note: ") and ("once more per image" if use_spectral else "170 times per image") in note
    assert use_spectral or "340 passes for 2 images" in note


def test_predict_explain_on_the_cpu_says_what_it_costs_before_it_starts(make_cfg, tmp_path, capsys):
    torch.manual_seed(0)
    model = rps.build_model(make_cfg(USE_SPECTRAL=False), torch.device("cpu")).eval()
    path = tmp_path / "x.png"
    Image.fromarray(rps.make_demo_image(np.random.default_rng(0), True)).save(path)
    written = heatmaps.write_explanations(model, [str(path)], tmp_path / "maps", threshold=0.5)
    assert [p.name for p in written] == ["x_png.png"]
    assert "note: heatmaps without the spectral branch run the backbone 170 times per image" in capsys.readouterr().err
