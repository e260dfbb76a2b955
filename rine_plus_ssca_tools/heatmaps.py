"""Heatmaps: where an image looks generated (`predict --explain DIR`, or in a notebook):

    from rine_plus_ssca import load_detector
    from rine_plus_ssca_tools.heatmaps import draw_explanation, explain
    model = load_detector("checkpoints/best_rine_plus_ssca.pth")
    draw_explanation(explain(model, ["photo.jpg"])[0])

The map of the default model comes from the model itself (RINEPlusSSCA.local_logits in the script);
explain(..., windows=True) gives the slower map whose cells are local by construction. The splices, scores
and deletion test below are what benchmarks/localisation.py and tests/test_explain.py measure them with.
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
def explain(model, images, batch_size=32, windows=False):
    """Where each image looks generated: a list of Explanation, one per image (a path, a PIL image, or a list).

    With the spectral branch (the default model) the map is the head's answer for each position of the
    spectral map (RINEPlusSSCA.local_logits): cheap, one backbone pass. Without it (RINE) each 32x32 window
    is mirror-tiled to a whole crop and scored: about 170 forward passes per image. Both are P(fake) at the
    model's temperature, so the map and the image's P(fake) read on one scale. The map covers the centre crop,
    the one predict scores without --tencrop. windows=True uses the windows on the spectral model too: slower,
    but each cell then depends on the pixels within 24 px of it only (the spectral tokens see the whole image
    through SSCA's global paths and the CLIP branch). See docs/GUIDE.md, "Heatmaps".
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
            if model.use_spectral and not windows:
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


def cell_gradient(model, pixels, row, column):
    """|d (the spectral-token map's logit at cell (row, column)) / d pixels|, summed over colour channels: [H,W].
    The CLIP branch is held at the image's value, as local_logits holds it, so this is the cell's reach
    through the spectral branch alone (DCT blocks, convolutions, SSCA's spatial gate and global filter)."""
    with torch.no_grad():
        z_clip, block_tokens, _ = model.branches(pixels)
    pixels = pixels.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        spectral_map = model.ssca(model.dct_conv(model.spectral_stem(pixels)))
        one_token = spectral_map[:, :, row:row + 1, column:column + 1]
        model.classifier(model.fused_representation(z_clip, block_tokens, one_token)).sum().backward()
    return pixels.grad.abs().sum(dim=1)[0]


def reach(gradient, row, column, share):
    """The half-side in pixels, from the centre of 8x8 cell (row, column), of the smallest square around it
    holding `share` of the gradient's total mass."""
    height, width = gradient.shape
    ys, xs = np.mgrid[0:height, 0:width]
    distance = np.maximum(np.abs(ys + 0.5 - (row + 0.5) * GRID), np.abs(xs + 0.5 - (column + 0.5) * GRID))
    order = np.argsort(distance.ravel(), kind="stable")
    mass = np.cumsum(np.asarray(gradient, dtype=np.float64).ravel()[order])
    return float(distance.ravel()[order][np.searchsorted(mass, share * mass[-1])])


def cells_to_pixels(cells, height, width):
    """[h,w] cell values spread over the [H,W] pixels they cover."""
    cells = np.asarray(cells, dtype=np.float64)
    return np.kron(cells, np.ones((height // cells.shape[0], width // cells.shape[1])))


def localisation_scores(cells, box, height, width):
    """How a map of cells [h,w] over an HxW crop points at a square box = (left, top, side):
    pointing (1.0 when the highest cell's centre is inside the square), pixel_auc (ROC AUC of the map's
    value at each pixel against the square's mask: 0.5 is chance, 1.0 every square pixel above every other)
    and mass (the share of the map's mass, its values minus its minimum, inside the square: chance is the
    square's share of the crop, 0.11 here)."""
    from sklearn.metrics import roc_auc_score

    left, top, side = box
    mask = np.zeros((height, width), dtype=bool)
    mask[top:top + side, left:left + side] = True
    x, y = peak_of(Explanation(crop=np.zeros((height, width)), local_logits=np.asarray(cells)))
    values = cells_to_pixels(cells, height, width)
    above_minimum = values - values.min()
    total = above_minimum.sum()
    return dict(pointing=float(left <= x < left + side and top <= y < top + side),
                pixel_auc=float(roc_auc_score(mask.ravel(), values.ravel())),
                mass=float(above_minimum[mask].sum() / total) if total > 0 else float(mask.mean()))


@torch.inference_mode()
def deletion_logits(model, spliced_crop, photo_crop, cells, fractions, batch_size=32):
    """The model's logit as the highest cells of `cells` [h,w] (ties: the first) are given back the photo's
    pixels, one logit per fraction of the cells restored: a map faithful to the model lowers the logit faster
    than random cells do. Crops uint8 [H,W,3] of the same size."""
    height, width = spliced_crop.shape[:2]
    order = np.argsort(-np.asarray(cells, dtype=np.float64).ravel(), kind="stable")
    columns = cells.shape[1]
    variants = []
    for fraction in fractions:
        variant = spliced_crop.copy()
        for index in order[:round(fraction * order.size)]:
            row, column = divmod(int(index), columns)
            rows, cols = slice(row * GRID, (row + 1) * GRID), slice(column * GRID, (column + 1) * GRID)
            variant[rows, cols] = photo_crop[rows, cols]
        variants.append(variant)
    device = next(model.parameters()).device
    logits = [model(normalise_uint8(torch.from_numpy(np.stack(variants[i:i + batch_size])).permute(0, 3, 1, 2).to(device)))[0]
              for i in range(0, len(variants), batch_size)]
    return torch.cat(logits).float().cpu().numpy()


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
    find) pasted at a random place inside its centre crop, a third of the crop's side (1/9 of its area).
    The demo's fakes are upsampled, so the square is smoother than the photo around it: an edge filter finds
    it too (make_matched_splice does not have that give-away).
    -> (uint8 [size,size,3], (left, top, side) of the square in the centre crop's coordinates)."""
    image, _, box = splice(rng, generator, size, crop_size)
    return image, box


def make_matched_splice(rng, generator="bilinear", size=256, crop_size=CROP_SIZE):
    """As make_spliced_demo_image, but the pasted square is re-noised until its high-frequency energy (the
    mean squared Laplacian, of the colour channels and of the grey image) matches that of the photo it
    covers: a detector must find the generator's trace, not a smooth patch. Gaussian noise of variance v adds
    20 v to the mean squared 4-neighbour Laplacian (the kernel's squared weights sum to 1 + 1 + 1 + 1 + 16).
    -> (spliced uint8 [size,size,3], the untouched photo uint8 [size,size,3], (left, top, side))."""
    return splice(rng, generator, size, crop_size, match_high_frequencies=True)


def laplacian(channels):
    """The 4-neighbour Laplacian of float [H,W,...] on its inner pixels: [H-2,W-2,...]."""
    return (channels[:-2, 1:-1] + channels[2:, 1:-1] + channels[1:-1, :-2] + channels[1:-1, 2:]
            - 4 * channels[1:-1, 1:-1])


def splice(rng, generator, size=256, crop_size=CROP_SIZE, match_high_frequencies=False):
    """(spliced image, the photo before splicing, (left, top, side)); see make_matched_splice."""
    image = make_demo_image(rng, False, size=size)
    photo = image.copy()
    donor = make_demo_image(rng, generator is not None, generator or "bilinear", size=size)
    side, crop_origin = round(crop_size / 3), on_grid((size - crop_size) // 2)  # CentreCrop's origin
    left, top = (int(v) for v in rng.integers(0, crop_size - side + 1, 2))
    donor_left, donor_top = (int(v) for v in rng.integers(0, size - side + 1, 2))
    square = donor[donor_top:donor_top + side, donor_left:donor_left + side].astype(np.float64)
    rows, columns = slice(crop_origin + top, crop_origin + top + side), slice(crop_origin + left, crop_origin + left + side)
    if match_high_frequencies:
        # Noise shared by the colour channels (a^2) and noise of each (b^2): per channel it adds 20 (a^2 + b^2)
        # to the mean squared Laplacian, to that of the grey image (the channels' mean) 20 (a^2 + b^2 / 3), so
        # both are matched, as a photo's noise and texture are partly shared by its channels.
        def energies(pixels):
            return (laplacian(pixels) ** 2).mean(), (laplacian(pixels.mean(axis=2)) ** 2).mean()
        (photo_colour, photo_grey), (square_colour, square_grey) = energies(photo[rows, columns].astype(np.float64)), energies(square)
        missing_colour, missing_grey = max(photo_colour - square_colour, 0.0) / 20, max(photo_grey - square_grey, 0.0) / 20
        own = max(1.5 * (missing_colour - missing_grey), 0.0)
        shared = max(missing_grey - own / 3, 0.0)
        square = (square + np.sqrt(shared) * rng.normal(0.0, 1.0, square.shape[:2] + (1,))
                  + np.sqrt(own) * rng.normal(0.0, 1.0, square.shape))
    image[rows, columns] = np.clip(np.round(square), 0, 255).astype(np.uint8)
    return image, photo, (left, top, side)
