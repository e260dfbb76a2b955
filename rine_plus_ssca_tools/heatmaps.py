"""Heatmaps: where an image looks generated (`predict --explain DIR`, or in a notebook):

    from rine_plus_ssca import load_detector
    from rine_plus_ssca_tools.heatmaps import draw_explanation, explain
    model = load_detector("checkpoints/best_rine_plus_ssca.pth")
    draw_explanation(explain(model, ["photo.jpg"])[0])

The map of the default model comes from the model itself (RINEPlusSSCA.local_logits in the script).
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from rine_plus_ssca import (CROP_SIZE, GRID, build_transform, called_fake, count_of, decision_threshold, head_amp_dtype,
                            head_autocast, load_rgb, make_demo_image, normalise_uint8, on_grid, probabilities_from_logits,
                            scores_as_rine)


EXPLAIN_WINDOW = 32  # without the spectral branch: side of the windows scored on their own (a multiple of 8)
EXPLAIN_STRIDE = 16  # ... and the step between them


class Explanation(SimpleNamespace):
    """One image explained. image: what was passed (a path, or None for a PIL image); crop: uint8 [H,W,3], the
    crop the detector sees; p_fake: its P(fake); local_p_fake: [h,w] map over the crop, the P(fake) the model
    gives when the whole image looks like that region; local_logits: the same before the sigmoid (no ties
    where probabilities round to 1); method: "spectral tokens" or "windows"; threshold: the one predict would
    use (the checkpoint's TARGET_FPR threshold when it stores one, else THRESHOLD); rine_scoring: fake only
    above it (RINE's own scoring) instead of at or above it."""


def mirror_tiled(window, size):
    """A size x size image made of `window` [h,w,3] and its mirror images: every part of it looks like the window.
    Windows a multiple of 8 wide keep the 8-pixel grid of the DCT and of JPEG."""
    return np.pad(window, ((0, size - window.shape[0]), (0, size - window.shape[1]), (0, 0)), mode="symmetric")


def window_origins(height, width, window=EXPLAIN_WINDOW, stride=EXPLAIN_STRIDE):
    """(top, left) of every window scored on its own: 13 x 13 = 169 on a 224 px crop."""
    return [(top, left) for top in range(0, height - window + 1, stride) for left in range(0, width - window + 1, stride)]


def backbone_passes_per_image(model):
    """Images the backbone sees to explain one image: the crop itself, plus each window without the spectral branch."""
    if model.use_spectral:
        return 1
    size = model.config["CROP_SIZE"]
    return 1 + len(window_origins(size, size))


@torch.inference_mode()
def window_logits(model, crop, batch_size=32, window=EXPLAIN_WINDOW, stride=EXPLAIN_STRIDE):
    """Without the spectral branch: every window of the crop [H,W,3] mirror-tiled to the crop's size and scored
    by the whole model; the logit of each 8x8 cell is the mean over the windows covering it. -> [H/8,W/8]."""
    height, width = crop.shape[:2]
    origins = window_origins(height, width, window, stride)
    device = next(model.parameters()).device
    sums, counts = torch.zeros(height // GRID, width // GRID), torch.zeros(height // GRID, width // GRID)
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        tiled = np.stack([mirror_tiled(crop[top:top + window, left:left + window], height) for top, left in chunk])
        logits, _ = model(normalise_uint8(torch.from_numpy(tiled).permute(0, 3, 1, 2).to(device)))
        for (top, left), logit in zip(chunk, logits.float().cpu()):
            cells = (slice(top // GRID, (top + window) // GRID), slice(left // GRID, (left + window) // GRID))
            sums[cells] += logit
            counts[cells] += 1
    return sums / counts.clamp(min=1)


@torch.inference_mode()
def explain(model, images, batch_size=32):
    """Where each image looks generated: a list of Explanation, one per image (a path, a PIL image, or a list).

    With the spectral branch (the default model) the map is the head's answer for each position of the
    spectral map (RINEPlusSSCA.local_logits): cheap, one backbone pass. Without it (RINE) each 32x32 window
    is mirror-tiled to a whole crop and scored: about 170 forward passes per image. Both are P(fake) at the
    model's temperature, so the map and the image's P(fake) read on one scale. The map covers the centre crop,
    the one predict scores without --tencrop. See docs/GUIDE.md, "Heatmaps".
    """
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    cfg = SimpleNamespace(**model.config)
    centre_crop = build_transform(cfg, train=False)
    device = next(model.parameters()).device
    amp_dtype, float32 = head_amp_dtype(cfg, device), scores_as_rine(cfg)
    threshold, _ = decision_threshold(model)  # what predict would decide with, so a drawn verdict matches it
    model.eval()
    explanations = []
    for image in images:
        crop = centre_crop(load_rgb(image))  # uint8 [3,H,W]
        with head_autocast(device, amp_dtype):
            if model.use_spectral:
                logit, local = model.local_logits(normalise_uint8(crop[None].to(device)))
                method = "spectral tokens"
            else:
                logit, _ = model(normalise_uint8(crop[None].to(device)))
                local, method = window_logits(model, crop.permute(1, 2, 0).numpy(), batch_size), "windows"
        explanations.append(Explanation(image=image if isinstance(image, (str, Path)) else None,
                                        crop=crop.permute(1, 2, 0).numpy(),
                                        p_fake=float(probabilities_from_logits(logit.cpu(), model.temperature, float32)[0]),
                                        local_p_fake=probabilities_from_logits(local.cpu().numpy().ravel(), model.temperature,
                                                                               float32).reshape(local.shape),
                                        local_logits=local.cpu().numpy(), method=method, threshold=threshold,
                                        rine_scoring=float32))
    return explanations


def peak_of(explanation):
    """(x, y) in the crop's pixels: the centre of the map's cell with the highest local P(fake) (the first if tied)."""
    cells = explanation.local_logits
    row, column = np.unravel_index(int(np.argmax(cells)), cells.shape)
    height, width = explanation.crop.shape[:2]
    return float((column + 0.5) * width / cells.shape[1]), float((row + 0.5) * height / cells.shape[0])


def draw_explanation(explanation, threshold=None):
    """The crop beside the crop under its map of local P(fake): a matplotlib Figure (notebooks show it; .savefig
    writes it). Built without pyplot, so it changes no backend and is safe in notebooks and scripts alike.
    The verdict in the title uses `threshold`, by default the one predict uses (explanation.threshold)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.6, 4.4))
    image_axis, map_axis = figure.subplots(1, 2)
    image_axis.imshow(explanation.crop)
    image_axis.set_title("crop the detector sees", fontsize=10)
    overlay = overlay_explanation(map_axis, explanation)
    map_axis.set_title(f"where it looks generated ({explanation.method})", fontsize=10)
    figure.colorbar(overlay, ax=map_axis, fraction=0.046, pad=0.03, label="local P(fake)")
    for axis in (image_axis, map_axis):
        axis.axis("off")
    threshold = explanation.threshold if threshold is None else threshold
    verdict = "fake" if called_fake(explanation.p_fake, threshold, strict=explanation.rine_scoring) else "real"
    figure.suptitle(f"P(fake) {explanation.p_fake:.3f}: {verdict} at threshold {threshold:g}",
                    color="red" if verdict == "fake" else "green")
    figure.tight_layout()
    return figure


def overlay_explanation(axis, explanation, alpha=0.55):
    """Draw the crop with its local P(fake) map over it on a matplotlib axis; returns the map's image (for a colour bar).
    The colour scale is fixed, 0 to 1: a real photo's map stays dark instead of being stretched to its own maximum."""
    height, width = explanation.crop.shape[:2]
    axis.imshow(explanation.crop)
    return axis.imshow(explanation.local_p_fake, cmap="inferno", vmin=0.0, vmax=1.0, alpha=alpha,
                       extent=(0, width, height, 0), interpolation="bilinear")


def explanation_file_names(paths):
    """A PNG name per image path: its file name with the extension kept (x.jpg -> x_jpg.png, so x.jpg and x.png get
    one picture each), with as many of the folders above it as make every name unique."""
    stems = [[part for part in Path(path).parent.parts if part not in ("/", "\\", "..", ".")]
             + [Path(path).stem + Path(path).suffix.replace(".", "_")] for path in paths]
    for depth in range(1, max((len(stem) for stem in stems), default=1) + 1):
        names = ["_".join(stem[-depth:]) for stem in stems]
        if len(set(names)) == len(names):
            return [name + ".png" for name in names]
    return [f"{index:04d}_{'_'.join(stem)}.png" for index, stem in enumerate(stems)]  # the same path twice


def write_explanations(model, paths, out_dir, threshold, batch_size=32):
    """predict --explain: one picture per image path in out_dir; returns the written paths."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if next(model.parameters()).device.type == "cpu":
        print(cost_note(model, len(paths)), file=sys.stderr)
    written = []
    for path, name in tqdm(list(zip(paths, explanation_file_names(paths))), desc="heatmaps", leave=False):
        figure = draw_explanation(explain(model, path, batch_size)[0], threshold)
        figure.savefig(out_dir / name, dpi=100)
        written.append(out_dir / name)
    return written


def cost_note(model, n_images):
    """One line before heatmaps are drawn on the CPU: how many backbone passes they need (a ViT-L/14 pass is the
    expensive part, about 160 GFLOP)."""
    passes = backbone_passes_per_image(model)
    if passes == 1:
        return (f"note: heatmaps run the backbone once more per image on the CPU, {n_images} more passes for "
                f"{count_of(n_images, 'image')} (the map comes from the spectral branch)")
    return (f"note: heatmaps without the spectral branch run the backbone {passes} times per image on the CPU (the "
            f"crop and each of its {passes - 1} windows), {passes * n_images} passes for {count_of(n_images, 'image')}; "
            "with ViT-L/14 that is a minute or more per image on a CPU, the progress bar moving once per image. "
            "A GPU (--device cuda) is much faster.")


def make_spliced_demo_image(rng, generator="bilinear", size=256, crop_size=CROP_SIZE):
    """A demo 'photo' with a square cut from a demo fake of `generator` (None: from another photo, nothing to
    find) pasted at a random place inside its centre crop, a third of the crop's side (1/9 of its area): what
    the heatmaps must find (tests, benchmarks/localisation.py).
    -> (uint8 [size,size,3], (left, top, side) of the square in the centre crop's coordinates)."""
    image = make_demo_image(rng, False, size=size)
    donor = make_demo_image(rng, generator is not None, generator or "bilinear", size=size)
    side, crop_origin = round(crop_size / 3), on_grid((size - crop_size) // 2)  # CentreCrop's origin
    left, top = (int(v) for v in rng.integers(0, crop_size - side + 1, 2))
    donor_left, donor_top = (int(v) for v in rng.integers(0, size - side + 1, 2))
    image[crop_origin + top:crop_origin + top + side, crop_origin + left:crop_origin + left + side] = \
        donor[donor_top:donor_top + side, donor_left:donor_left + side]
    return image, (left, top, side)
