"""RINE as published: USE_SPECTRAL=False is RINE's model, and RINE's released weights load with import-rine.

The reference here is RINE's forward pass (mever-team/rine, src/models.py) written out from scratch:
a separately loaded HuggingFace CLIPVisionModel with our own hooks on each block's layer_norm2
(RINE hooks `ln_2` of OpenAI's CLIP), the CLS token, torchvision's CenterCrop(224) without a
resize, CLIP's normalisation, and plain tensor operations on the state dict. Nothing from the
script's modules or transforms is used for it.
"""

import argparse
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, nonempty_lines, run_main, write_demo_tree
import rine_plus_ssca as rps
from rine_plus_ssca_tools import rine_format

WIDTH, N_BLOCKS = TINY["hidden_size"], TINY["num_hidden_layers"]  # the tiny backbone: width 64, 4 blocks
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def rine_layout(width, n_blocks, dim, nproj):
    """{key: shape} of RINE's trainable checkpoint, from RINE's Model.__init__ (nn.Sequential indices)."""
    layout = {"alpha": (1, n_blocks, dim)}
    for name in ("proj1", "proj2"):
        index = 1  # proj = [Dropout] + nproj x [Linear, ReLU, Dropout]
        for i in range(nproj):
            layout[f"{name}.{index}.weight"] = (dim, width if (name == "proj1" and i == 0) else dim)
            layout[f"{name}.{index}.bias"] = (dim,)
            index += 3
    layout.update({"head.0.weight": (dim, dim), "head.0.bias": (dim,), "head.3.weight": (dim, dim),
                   "head.3.bias": (dim,), "head.6.weight": (1, dim), "head.6.bias": (1,)})
    return layout


def random_rine_state(width, n_blocks, dim, nproj, seed=0):
    """Random tensors in RINE's layout (He-scaled weights, alpha ~ N(0,1) as RINE initialises it)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in rine_layout(width, n_blocks, dim, nproj).items():
        scale = 1.0 if key == "alpha" else (2.0 / shape[-1]) ** 0.5 if key.endswith("weight") else 0.1
        state[key] = torch.randn(shape, generator=generator) * scale
    return state


def centred_rine_state(backbone_folder, dim, nproj, seed=0):
    """random_rine_state with the last bias shifted so logits on sample images sit around 0 (P(fake) not saturated)."""
    state = random_rine_state(WIDTH, N_BLOCKS, dim, nproj, seed)
    state["head.6.bias"] -= rine_reference_logits(backbone_folder, state, sample_images(seed=99)).mean()
    return state


def rine_reference_logits(backbone_folder, state, images):
    """RINE's forward, written out: logits [N] for a list of PIL images, in float32."""
    from torchvision import transforms

    preprocess = transforms.Compose([transforms.CenterCrop(224), transforms.ToTensor(),
                                     transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    return rine_reference_forward(backbone_folder, state, torch.stack([preprocess(image.convert("RGB")) for image in images]))


def zero_padded_to_224(image):
    """A small image padded with zeros to at least 224 px a side, split as torchvision's CenterCrop splits it
    (the smaller half before): RINE's code crashes on small images under TenCrop; the script pads them so."""
    pixels = np.asarray(image.convert("RGB"))
    pad_h, pad_w = max(0, 224 - pixels.shape[0]), max(0, 224 - pixels.shape[1])
    return Image.fromarray(np.pad(pixels, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))))


def rine_reference_ten_crop_probabilities(backbone_folder, state, images):
    """RINE's ten-crop scoring (src/utils.py, evaluation and get_transforms), written out: TenCrop(224) of each
    image, PILToTensor / 255, CLIP's normalisation, one forward over all crops, then in float32
    sigmoid(logits.view(N, 10).mean(1)). -> P(fake) [N], float32."""
    from torchvision import transforms

    to_crops = transforms.Compose([
        transforms.TenCrop(224),
        transforms.Lambda(lambda crops: torch.stack([transforms.PILToTensor()(crop) for crop in crops])),
        transforms.Lambda(lambda x: x / 255),
        transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    pixels = torch.stack([to_crops(zero_padded_to_224(image)) for image in images])  # [N, 10, 3, 224, 224]
    logits = rine_reference_forward(backbone_folder, state, pixels.view(-1, 3, 224, 224))
    return torch.sigmoid(logits.float().view(len(images), 10).mean(1))


def rine_reference_forward(backbone_folder, state, pixels):
    """RINE's Model.forward on CLIP-normalised pixels [N,3,224,224]: logits [N], in float32."""
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(backbone_folder, dtype=torch.float32, attn_implementation="eager").eval()
    caught = []
    hooks = [module.register_forward_hook(lambda module, inputs, output: caught.append(output[:, 0]))
             for name, module in clip.named_modules() if name.endswith("layer_norm2")]
    assert len(hooks) == N_BLOCKS
    with torch.no_grad():
        clip(pixel_values=pixels)
    for hook in hooks:
        hook.remove()
    g = torch.stack(caught, dim=1)  # [N, blocks, width]: CLS token after each block's second LayerNorm

    def linear(x, key):
        return x @ state[f"{key}.weight"].T + state[f"{key}.bias"]

    def proj(x, name):  # eval mode: the Dropouts do nothing
        for key in sorted({k.rsplit(".", 1)[0] for k in state if k.startswith(name + ".")},
                          key=lambda k: int(k.split(".")[1])):
            x = torch.relu(linear(x, key))
        return x

    z = (torch.softmax(state["alpha"], dim=1) * proj(g, "proj1")).sum(dim=1)
    z = proj(z, "proj2")
    h = torch.relu(linear(z, "head.0"))
    h = torch.relu(linear(h, "head.3"))
    return linear(h, "head.6")[:, 0]


def sample_images(seed=0):
    """Demo 'photos' and 'fakes' of several sizes: larger ones are centre-cropped, the small one padded (as CenterCrop does)."""
    rng = np.random.default_rng(seed)
    sizes = [(224, 224), (300, 260), (257, 401), (180, 200)]
    return [Image.fromarray(rps.make_demo_image(rng, fake=bool(i % 2), size=max(w, h))[:h, :w])
            for i, (w, h) in enumerate(sizes)]


def script_logits(model, images):
    """The imported model's logits through the script's own test transform."""
    transform = rps.build_transform(argparse.Namespace(**model.config), train=False)
    pixels = rps.normalise_uint8(torch.stack([transform(image) for image in images]))
    with torch.no_grad():
        return model(pixels)[0]


def import_rine(rine_file, out, backbone, cwd):
    """The import-rine command, through main() in this process."""
    return run_main(["import-rine", "--ckpt", rine_file, "--out", out, "--clip-model", backbone, "--amp", "off"], cwd=cwd)


# --------------------------------------------------------------------------- import-rine

@pytest.mark.parametrize("nproj, dim", [(2, 48), (4, 24)])
def test_import_rine_then_predict_equals_rines_forward(tmp_path, tiny_backbone, nproj, dim):
    state = centred_rine_state(tiny_backbone, dim, nproj, seed=nproj)
    torch.save(state, tmp_path / "model_trainable.pth")
    result = import_rine("model_trainable.pth", "imported.pth", tiny_backbone, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"d'={dim}, NPROJ={nproj}" in result.stdout

    checkpoint = torch.load(tmp_path / "imported.pth", weights_only=True)
    config = checkpoint["architecture"]
    assert (config["PROJ_DIM"], config["NPROJ"], config["USE_SPECTRAL"], config["USE_TIE"]) == (dim, nproj, False, True)
    assert (config["BLOCKS"], config["CROP_SIZE"], config["CLIP_MODEL"]) == ("all", 224, tiny_backbone)
    assert checkpoint["model"].keys() == state.keys()
    assert all(torch.equal(checkpoint["model"][k], state[k]) for k in state)

    images = sample_images()
    expected = rine_reference_logits(tiny_backbone, state, images)
    assert expected.std() > 0.1 and expected.abs().max() < 5  # neither constant nor saturated
    model = rps.load_detector(tmp_path / "imported.pth", device="cpu")
    assert next(model.backbone.parameters()).dtype == torch.float32
    torch.testing.assert_close(script_logits(model, images), expected, rtol=0, atol=1e-5)
    probabilities = rps.predict(model, images)
    np.testing.assert_allclose(probabilities, torch.sigmoid(expected).numpy(), rtol=0, atol=1e-5)


def test_imported_rine_with_tencrop_equals_rines_ten_crop_scoring(tmp_path, tiny_backbone, monkeypatch):
    state = centred_rine_state(tiny_backbone, 32, 2, seed=5)
    torch.save(state, tmp_path / "model_trainable.pth")
    # AMP auto (import-rine's default): on the CPU RINE's clip.load runs float32, so the script does too,
    # even on a CPU where auto would otherwise pick bf16.
    result = run_main(["import-rine", "--ckpt", "model_trainable.pth", "--out", "imported.pth",
                       "--clip-model", tiny_backbone], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    monkeypatch.setattr(rps, "cpu_has_fast_bf16", lambda: True)
    model = rps.load_detector(tmp_path / "imported.pth", device="cpu")
    assert next(model.backbone.parameters()).dtype == torch.float32

    images = sample_images(seed=3)  # 224 x 224, two larger ones, and 180 x 200: under the crop both ways
    rng = np.random.default_rng(4)
    images.append(Image.fromarray(rps.make_demo_image(rng, fake=True, size=320)[:300, :150]))  # narrow only
    expected = rine_reference_ten_crop_probabilities(tiny_backbone, state, images)
    assert expected.std() > 0.01 and 0.01 < expected.min() and expected.max() < 0.99  # neither constant nor saturated
    np.testing.assert_allclose(rps.predict(model, images, tencrop=True), expected.numpy(), rtol=0, atol=1e-5)
    # eval and predict read files through a DataLoader (score_items): no image is skipped there either.
    paths = []
    for i, image in enumerate(images):
        image.convert("RGB").save(tmp_path / f"image_{i}.png")
        paths.append(str(tmp_path / f"image_{i}.png"))
    scores, _, unreadable = rps.score_items(model, [(path, 0, "") for path in paths], num_workers=0, tencrop=True)
    assert unreadable == []
    np.testing.assert_allclose([scores[path] for path in paths], expected.numpy(), rtol=0, atol=1e-5)


def test_rine_scoring_calls_one_half_real_and_saturates_as_rine_does(tmp_path, tiny_backbone):
    state = random_rine_state(WIDTH, N_BLOCKS, 16, 2)
    state["head.6.weight"].zero_()
    state["head.6.bias"].zero_()  # every logit exactly 0: P(fake) exactly 0.5
    torch.save(state, tmp_path / "rine.pth")
    rps.atomic_torch_save(rine_format.rine_checkpoint(tmp_path / "rine.pth", tiny_backbone, "off"), tmp_path / "imported.pth")
    model = rps.load_detector(tmp_path / "imported.pth", device="cpu")
    rng = np.random.default_rng(0)
    items = []
    for i, fake in enumerate((False, True, False, True)):
        path = tmp_path / "data" / "gen" / ("1_fake" if fake else "0_real") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rps.make_demo_image(rng, fake)).save(path)
        items.append((str(path), int(fake), "gen"))

    rows, _, _, probs, _ = rps.evaluate_items(model, items, num_workers=0)
    assert probs.tolist() == [0.5] * 4
    table = dict(zip(rps.METRIC_COLUMNS, rows[0][1:]))
    assert (table["real_acc"], table["fake_acc"]) == (1.0, 0.0)  # RINE: fake when P(fake) > 0.5
    result = run_main(["predict", "--ckpt", "imported.pth", items[1][0], "--device", "cpu", "--num-workers", "0"],
                      cwd=tmp_path)
    assert result.returncode == 0 and re.search(r"^\s*0\.5000\s+real\s", result.stdout, re.M), result.stdout

    with torch.no_grad():
        model.head[6].bias.fill_(20.0)  # RINE's float32 sigmoid says exactly 1 above a logit of about 16.6
    assert rps.predict(model, items[0][0]).tolist() == [1.0]
    model.config["TEST_CROP"] = "grid"  # the script's own scoring: float64, fake when P(fake) >= threshold
    assert rps.predict(model, items[0][0])[0] < 1.0
    with torch.no_grad():
        model.head[6].bias.fill_(0.0)
    rows, _, _, probs, _ = rps.evaluate_items(model, items, num_workers=0)
    assert dict(zip(rps.METRIC_COLUMNS, rows[0][1:]))["real_acc"] == 0.0


def test_rine_scoring_runs_the_backbone_as_rines_clip_load_does(monkeypatch):
    # OpenAI's clip.load: fp16 on a GPU, float32 on the CPU; an AMP set explicitly still wins.
    monkeypatch.setattr(rps, "cpu_has_fast_bf16", lambda: True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert rps.resolve_amp_dtype("auto", cpu) == torch.bfloat16
    assert rps.resolve_amp_dtype("auto", cpu, rine_scoring=True) is None
    assert rps.resolve_amp_dtype("auto", cuda, rine_scoring=True) == torch.float16
    assert rps.resolve_amp_dtype("bf16", cuda, rine_scoring=True) == torch.bfloat16
    # RINE's head runs in float32 on the backbone's tokens: no autocast for it.
    assert rps.head_amp_dtype(argparse.Namespace(TEST_CROP="rine", AMP="bf16"), cuda) is None
    assert rps.head_amp_dtype(argparse.Namespace(TEST_CROP="grid", AMP="bf16"), cuda) == torch.bfloat16


def _pickled_object(path):
    torch.save({"alpha": argparse.Namespace(value=1)}, path)  # a class weights_only=True refuses to unpickle


def _not_a_dict(path):
    torch.save(torch.zeros(3), path)


def _missing_head(path):
    state = random_rine_state(WIDTH, N_BLOCKS, 16, 2)
    del state["head.6.weight"], state["head.6.bias"]
    torch.save(state, path)


def _inconsistent_shapes(path):
    state = random_rine_state(WIDTH, N_BLOCKS, 16, 2)
    state["proj2.4.weight"] = torch.zeros(16, 17)
    torch.save(state, path)


def _our_own_checkpoint(path):
    torch.save(random_rine_state(WIDTH, N_BLOCKS, 16, 2), path.with_name("rine.pth"))
    torch.save(rine_format.rine_checkpoint(path.with_name("rine.pth"), "backbone", "off"), path)


def _text_file(path):
    path.write_text("not a checkpoint\n")


@pytest.mark.parametrize("write_wrong_file", [_pickled_object, _not_a_dict, _missing_head, _inconsistent_shapes,
                                              _our_own_checkpoint, _text_file, None])
def test_import_rine_refuses_a_wrong_file_in_one_line(tmp_path, tiny_backbone, write_wrong_file):
    if write_wrong_file is not None:  # None: the file does not exist
        write_wrong_file(tmp_path / "wrong.pth")
    result = import_rine("wrong.pth", "out.pth", tiny_backbone, cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "wrong.pth" in lines[0], result.stderr
    if write_wrong_file is _our_own_checkpoint:
        assert "already a checkpoint of rine_plus_ssca.py" in lines[0], lines[0]
    assert not (tmp_path / "out.pth").exists()


def test_loading_rines_own_file_as_a_checkpoint_says_to_import_it_first(tmp_path):
    rine_file = tmp_path / "model_2class_trainable.pth"
    torch.save(random_rine_state(WIDTH, N_BLOCKS, 16, 2), rine_file)
    with pytest.raises(rps.UserError, match=r"RINE's own weights .* import-rine --ckpt \S*model_2class_trainable.pth"):
        rps.load_detector(rine_file, device="cpu")


@pytest.mark.parametrize("width, n_blocks", [(WIDTH, N_BLOCKS + 2), (WIDTH + 16, N_BLOCKS)])
def test_a_backbone_of_another_shape_is_refused_when_loaded(tmp_path, tiny_backbone, width, n_blocks):
    torch.save(random_rine_state(width, n_blocks, 16, 2), tmp_path / "rine.pth")
    atomic = rine_format.rine_checkpoint(tmp_path / "rine.pth", tiny_backbone, "off")
    rps.atomic_torch_save(atomic, tmp_path / "imported.pth")
    with pytest.raises(rps.UserError, match=f"width {width} with {n_blocks} blocks, but .* has width 64 with 4 blocks"):
        rps.load_detector(tmp_path / "imported.pth", device="cpu")


# --------------------------------------------------------------------------- training RINE, writing RINE's format

@pytest.mark.slow  # trains, through main() in this process
def test_no_use_spectral_trains_rine_and_round_trips_through_rines_format(tmp_path, tiny_backbone):
    write_demo_tree(tmp_path / "data", {"train": {"nearest": 8, "bilinear": 8}, "val": {"nearest": 4, "bilinear": 4}},
                    seed=3)
    result = run_main(["--no-use-spectral", "--data-dir", "data", "--checkpoint-dir", "ckpt",
                       "--clip-model", tiny_backbone, "--proj-dim", "16", "--nproj", "4", "--epochs", "1",
                       "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--amp", "off"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trained_path = tmp_path / "ckpt" / rps.BEST_NAME
    trained = torch.load(trained_path, weights_only=True)
    layout = rine_layout(WIDTH, N_BLOCKS, 16, 4)
    assert {k: tuple(v.shape) for k, v in trained["model"].items()} == layout  # exactly RINE's names and shapes

    result = run_main(["export", "--ckpt", trained_path, "--out", "rine_trainable.pth", "--rine-format"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    exported = torch.load(tmp_path / "rine_trainable.pth", weights_only=True)
    assert type(exported) is dict and {k: tuple(v.shape) for k, v in exported.items()} == layout
    assert all(torch.equal(exported[k], trained["model"][k]) for k in layout)

    result = import_rine("rine_trainable.pth", "reimported.pth", tiny_backbone, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    images = sample_images(seed=1)
    trained_model = rps.load_detector(trained_path, device="cpu", calibrated=False)  # RINE's format has no temperature
    reimported_model = rps.load_detector(tmp_path / "reimported.pth", device="cpu")
    assert reimported_model.calibration is None and reimported_model.temperature == 1.0
    expected = rine_reference_logits(tiny_backbone, exported, images)
    torch.testing.assert_close(script_logits(trained_model, images), expected, rtol=0, atol=1e-5)
    assert reimported_model.config["TEST_CROP"] == "rine" and trained_model.config["TEST_CROP"] == "grid"
    trained_model.config["TEST_CROP"] = "rine"  # the same crops as the re-imported detector's
    np.testing.assert_allclose(rps.predict(reimported_model, images), rps.predict(trained_model, images),
                               rtol=0, atol=1e-6)


def test_rine_mode_without_tie_is_written_with_alpha_zero_and_predicts_the_same(tmp_path, make_cfg):
    # USE_TIE=False averages over blocks; RINE's format has no such switch, and softmax(0) is that mean.
    torch.manual_seed(0)
    model = rps.RINEPlusSSCA(make_cfg(USE_SPECTRAL=False, USE_TIE=False, PROJ_DIM=16)).eval()
    assert "alpha" not in model.trainable_state_dict()
    rps.atomic_torch_save(rps.make_checkpoint(model, 1, {}, []), tmp_path / "mean.pth")
    state = rine_format.rine_weights(rps.read_checkpoint(tmp_path / "mean.pth"), tmp_path / "mean.pth")
    assert torch.equal(state["alpha"], torch.zeros(1, N_BLOCKS, 16))
    torch.save(state, tmp_path / "rine.pth")
    rps.atomic_torch_save(rine_format.rine_checkpoint(tmp_path / "rine.pth", model.config["CLIP_MODEL"], "off"),
                          tmp_path / "imported.pth")
    images = sample_images(seed=2)
    model.config["TEST_CROP"] = "rine"  # the imported detector crops as RINE does; compare on the same crops
    np.testing.assert_allclose(rps.predict(rps.load_detector(tmp_path / "imported.pth", device="cpu"), images),
                               rps.predict(model, images), rtol=0, atol=1e-6)


def test_rine_format_refuses_the_full_model_and_a_subset_of_blocks(tmp_path, make_cfg):
    for overrides, message in ((dict(), "RINE\\+SSCA checkpoint"), (dict(USE_SPECTRAL=False, BLOCKS="0-2"), "BLOCKS")):
        model = rps.RINEPlusSSCA(make_cfg(**overrides))
        rps.atomic_torch_save(rps.make_checkpoint(model, 1, {}, []), tmp_path / "model.pth")
        with pytest.raises(rps.UserError, match=message):
            rine_format.rine_weights(rps.read_checkpoint(tmp_path / "model.pth"), tmp_path / "model.pth")
