"""Does a heatmap find a generated square pasted into a real photo, better than an edge filter does?

    python rine_plus_ssca.py --demo        # once: the demo checkpoint
    python benchmarks/localisation.py --ckpt checkpoints/demo/best_rine_plus_ssca.pth

Each of --n images per generator (default 30, seeded) is a demo 'photo' with a square a third of the crop's
side (1/9 of its area) cut from a demo fake and pasted at a random place in the centre crop. By default
(--splice matched) the square is re-noised until its high-frequency energy matches the photo it covers
(rine_plus_ssca_tools/heatmaps.py, make_matched_splice): the demo's fakes are upsampled and smooth, and with
--splice plain (the squares as cut) the lowest-Laplacian-energy cell finds them with no model at all.
Re-noising to the photo's own level removes that give-away and leaves the generator's pattern (nearest's
repeated pixels, transposed_conv's checkerboard, bilinear's correlations) under noise like the photo's.

Scores per method and generator (rine_plus_ssca_tools/heatmaps.py, localisation_scores): pointing (the map's
highest cell inside the square; chance 0.11), pixel AUC (the map against the square's mask; chance 0.5)
and mass (share of the map above its minimum inside the square; chance 0.11). The "real" row pastes a
square from another real photo: nothing generated to find, so a map should stay at chance there.

Methods (maps on the crop's 8x8 cells):
  spectral tokens        heatmaps.explain: the head's logit for each spectral token as if the whole map were it
  windows                heatmaps.explain(windows=True): 32x32 windows mirror-tiled and scored alone (local)
  untrained tokens       spectral tokens from a head of the same shape that learned nothing (control)
  low HF energy          minus the mean squared Laplacian of each cell (baseline, no model)
  high HF energy         the mean squared Laplacian of each cell (baseline, no model)
  random                 uniform random cells (baseline)
  occlusion, grad-cam, attention, spatial gate, input gradient: older candidates, on request (--methods)
Then a deletion test (the photo's pixels given back to the highest cells, against random cells) and the
receptive field of a spectral token measured by gradients.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rine_plus_ssca as rps  # noqa: E402
from rine_plus_ssca_tools import heatmaps  # noqa: E402

GENERATORS = ("bilinear", "nearest", "transposed_conv", "real")
DELETION_FRACTIONS = (0.0, 1 / 18, 1 / 9, 2 / 9, 1 / 3)  # of the crop's cells given back; the square is 1/9


def spliced_images(n, generator, seed, matched=True):
    """[(spliced uint8 image, photo before splicing, (left, top, side))]; generator "real" pastes a square
    from another real photo."""
    rng = np.random.default_rng(seed)
    return [heatmaps.splice(rng, None if generator == "real" else generator, match_high_frequencies=matched)
            for _ in range(n)]


def centre_crop_pixels(model, image):
    """(uint8 crop [H,W,3], CLIP-normalised [1,3,H,W]) as the model sees it."""
    crop = rps.build_transform(rps.SimpleNamespace(**model.config), train=False)(rps.Image.fromarray(image))
    return crop.permute(1, 2, 0).numpy(), rps.normalise_uint8(crop[None])


def ssca_output_map(model, pixels, keep_gradient=False):
    """The spectral map after SSCA [1,C,h,w] and the logit computed from it."""
    z_clip, block_tokens, spectral_map = model.branches(pixels)
    if keep_gradient:
        spectral_map.retain_grad()
    return spectral_map, model.classifier(model.fused_representation(z_clip, block_tokens, spectral_map))


def grad_cam(model, crop, pixels):
    with torch.enable_grad():
        spectral_map, logit = ssca_output_map(model, pixels, keep_gradient=True)
        logit.sum().backward()
    return torch.relu((spectral_map.grad * spectral_map).sum(1))[0].detach()


def attention_weights(model, crop, pixels):
    with torch.no_grad():
        z_clip, _, spectral_map = model.branches(pixels)
        attention = model.fusion.clip_attends_spectrum
        tokens = spectral_map.flatten(2).transpose(1, 2)
        query = attention.query(model.fusion.clip_query(z_clip)).view(1, attention.heads, attention.head_dim)
        key_weight = attention.key.weight.view(attention.heads, attention.head_dim, -1)
        scores = torch.einsum("bhd,hdk->bhk", query * attention.head_dim ** -0.5, key_weight) @ tokens.transpose(1, 2)
    return scores.softmax(-1)[0].mean(0).view(spectral_map.shape[-2:])


def spatial_gate(model, crop, pixels):
    with torch.no_grad():
        stem = model.dct_conv(model.spectral_stem(pixels))
        return model.ssca.spatial_gate(stem)[0, 0]


def input_gradient(model, crop, pixels):
    pixels = pixels.clone().requires_grad_(True)
    with torch.enable_grad():
        model(pixels)[0].sum().backward()
    return F.avg_pool2d((pixels.grad * pixels).abs().sum(1, keepdim=True), rps.GRID)[0, 0]


def occlusion(model, crop, pixels, window=32, stride=16):
    """Mean logit drop over the windows covering each 8x8 cell when the window is replaced by noise."""
    rng = np.random.default_rng(0)
    height, width = crop.shape[:2]
    with torch.no_grad():
        base = model(pixels)[0].item()
        origins = [(t, l) for t in range(0, height - window + 1, stride) for l in range(0, width - window + 1, stride)]
        variants = []
        for top, left in origins:
            region = crop[top:top + window, left:left + window].astype(np.float64)
            variant = crop.copy()
            noise = rng.normal(region.mean((0, 1)), region.std((0, 1)) + 1e-6, region.shape)
            variant[top:top + window, left:left + window] = np.clip(noise, 0, 255).astype(np.uint8)
            variants.append(variant)
        logits = torch.cat([model(rps.normalise_uint8(torch.from_numpy(np.stack(variants[i:i + 32])).permute(0, 3, 1, 2)))[0]
                            for i in range(0, len(variants), 32)])
    sums, counts = torch.zeros(height // 8, width // 8), torch.zeros(height // 8, width // 8)
    for (top, left), logit in zip(origins, logits):
        sums[top // 8:(top + window) // 8, left // 8:(left + window) // 8] += base - logit.item()
        counts[top // 8:(top + window) // 8, left // 8:(left + window) // 8] += 1
    return sums / counts.clamp(min=1)


def spectral_tokens(model, crop, pixels):
    return torch.from_numpy(heatmaps.explain(model, rps.Image.fromarray(crop))[0].local_logits)


def windows(model, crop, pixels):
    return torch.from_numpy(heatmaps.explain(model, rps.Image.fromarray(crop), windows=True)[0].local_logits)


def cell_laplacian_energy(crop):
    """The mean squared Laplacian of each 8x8 cell of the crop (grey levels), edge pixels repeated: [h,w]."""
    grey = np.pad(crop.astype(np.float64).mean(axis=2), 1, mode="edge")
    energy = heatmaps.laplacian(grey) ** 2
    height, width = energy.shape
    return torch.from_numpy(energy.reshape(height // rps.GRID, rps.GRID, width // rps.GRID, rps.GRID).mean(axis=(1, 3)))


def low_hf_energy(model, crop, pixels):
    return -cell_laplacian_energy(crop)


def high_hf_energy(model, crop, pixels):
    return cell_laplacian_energy(crop)


def random_cells(model, crop, pixels):
    generator = torch.Generator().manual_seed(int(crop.sum()) % (2 ** 31))  # a fixed draw per image
    return torch.rand(crop.shape[0] // rps.GRID, crop.shape[1] // rps.GRID, generator=generator)


SPECTRAL_ONLY = {"spectral tokens", "untrained tokens", "grad-cam", "attention", "spatial gate", "input gradient"}
METHODS = {"spectral tokens": spectral_tokens, "windows": windows, "untrained tokens": spectral_tokens,
           "low HF energy": low_hf_energy, "high HF energy": high_hf_energy, "random": random_cells,
           "occlusion": occlusion, "grad-cam": grad_cam, "attention": attention_weights, "spatial gate": spatial_gate,
           "input gradient": input_gradient}
DEFAULT_METHODS = "spectral tokens,windows,untrained tokens,low HF energy,high HF energy,random"


def maps_and_scores(model, method, images):
    """([cells per image], {score: mean over images}, seconds per image)."""
    maps, scores, started = [], [], time.perf_counter()
    for image, _, box in images:
        crop, pixels = centre_crop_pixels(model, image)
        cells = method(model, crop, pixels).detach().float().numpy()
        maps.append(cells)
        scores.append(heatmaps.localisation_scores(cells, box, *crop.shape[:2]))
    means = {key: float(np.mean([score[key] for score in scores])) for key in scores[0]}
    return maps, means, (time.perf_counter() - started) / len(images)


def deletion_curves(model, images, maps, random_orders=3, seed=0):
    """(mean logit per DELETION_FRACTIONS restoring the map's highest cells first, the same for random cells)."""
    rng = np.random.default_rng(seed)
    by_map, by_chance = [], []
    for (image, photo, _), cells in zip(images, maps):
        spliced_crop, _ = centre_crop_pixels(model, image)
        photo_crop, _ = centre_crop_pixels(model, photo)
        by_map.append(heatmaps.deletion_logits(model, spliced_crop, photo_crop, cells, DELETION_FRACTIONS))
        by_chance += [heatmaps.deletion_logits(model, spliced_crop, photo_crop, rng.random(cells.shape), DELETION_FRACTIONS)
                      for _ in range(random_orders)]
    return np.mean(by_map, axis=0), np.mean(by_chance, axis=0)


def receptive_field(model, size=224):
    """Gradient reach of spectral tokens on a demo photo: {what: figure}."""
    photo = rps.make_demo_image(np.random.default_rng(0), False, size=size)
    pixels = rps.normalise_uint8(torch.from_numpy(photo).permute(2, 0, 1)[None])
    cells = size // rps.GRID
    centre = heatmaps.cell_gradient(model, pixels, cells // 2, cells // 2).numpy()
    corner = heatmaps.cell_gradient(model, pixels, 0, 0).numpy()
    quarter, middle = size // 4, (cells // 2) * rps.GRID + rps.GRID // 2  # middle: the centre cell's centre pixel
    return {"centre cell: half-side holding 50% of |gradient|": heatmaps.reach(centre, cells // 2, cells // 2, 0.5),
            "centre cell: half-side holding 90% of |gradient|": heatmaps.reach(centre, cells // 2, cells // 2, 0.9),
            "centre cell: half-side holding 99% of |gradient|": heatmaps.reach(centre, cells // 2, cells // 2, 0.99),
            "centre cell: share of |gradient| beyond 36 px (the old 72x72 estimate)": float(
                centre.sum() - centre[middle - 36:middle + 36, middle - 36:middle + 36].sum())
            / float(centre.sum()),
            "corner cell (0, 0): share of |gradient| in the opposite quarter": float(
                corner[-quarter:, -quarter:].sum() / corner.sum())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default="checkpoints/demo/best_rine_plus_ssca.pth", help="the demo's checkpoint")
    parser.add_argument("--n", type=int, default=30, help="spliced images per generator")
    parser.add_argument("--splice", choices=("matched", "plain"), default="matched",
                        help="matched: squares re-noised to the photo's high-frequency energy; plain: as cut")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--deletion-n", type=int, default=10, help="images per generator in the deletion test (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not Path(args.ckpt).is_file():
        sys.exit(f"error: {args.ckpt} not found; run `python rine_plus_ssca.py --demo` first (or pass --ckpt).")
    torch.manual_seed(args.seed)
    model = rps.load_detector(args.ckpt, device="cpu")
    untrained = rps.build_model(untrained_config(model, args.ckpt), torch.device("cpu")).eval()
    images = {generator: spliced_images(args.n, generator, args.seed + index, args.splice == "matched")
              for index, generator in enumerate(GENERATORS)}
    print(f"{args.n} demo photos per generator, each with a {images['real'][0][2][2]} px square ({args.splice} splice; "
          f"1/9 of the crop). Checkpoint {args.ckpt}.\nChance: pointing 0.11, pixel AUC 0.50, mass 0.11.\n")
    print(f"{'method':<18} {'square from':<16} {'pointing':>8} {'pixel AUC':>9} {'mass':>6}  {'ms/image':>8}")
    maps = {}
    for name in args.methods.split(","):
        if name in SPECTRAL_ONLY and not model.use_spectral:
            print(f"{name:<18} {'':<16} {'n/a':>8}  (needs the spectral branch)")
            continue
        scorer = untrained if name.startswith("untrained") else model
        for generator in GENERATORS:
            maps[name, generator], means, seconds = maps_and_scores(scorer, METHODS[name], images[generator])
            print(f"{name:<18} {generator:<16} {means['pointing']:8.2f} {means['pixel_auc']:9.3f} {means['mass']:6.3f}  "
                  f"{1000 * seconds:8.0f}", flush=True)
    if args.deletion_n:
        print(f"\ndeletion: the photo's pixels given back to the highest cells of each map (first {args.deletion_n} "
              f"images per generator), the model's mean logit after giving back {', '.join(f'{f:.3f}' for f in DELETION_FRACTIONS)} "
              "of the cells; 'random' is 3 random orders per image. A faithful map lowers it faster than random.")
        for generator in GENERATORS[:-1]:
            chance = None
            for name in args.methods.split(","):
                if (name, generator) not in maps or name.startswith("untrained") or name == "random":
                    continue
                curve, chance = deletion_curves(model, images[generator][:args.deletion_n], maps[name, generator][:args.deletion_n])
                print(f"  {generator:<16} {name:<18} " + "  ".join(f"{v:7.2f}" for v in curve))
            if chance is not None:
                print(f"  {generator:<16} {'random':<18} " + "  ".join(f"{v:7.2f}" for v in chance), flush=True)
    if model.use_spectral and model.spectral_input != "clip_patches":
        print("\nreceptive field of a spectral token, by gradients of its logit (CLIP branch held) on a demo photo:")
        for what, value in receptive_field(model).items():
            print(f"  {what}: {value:.3g}")


def untrained_config(model, checkpoint_path):
    """The model's configuration, its backbone found as load_detector finds it."""
    cfg = rps.default_config()
    cfg.__dict__.update(model.config)
    cfg.CLIP_MODEL = rps.resolve_backbone_location(cfg.CLIP_MODEL, checkpoint_path,
                                                   rps.read_checkpoint(checkpoint_path).get("backbone_folder"))
    return cfg


if __name__ == "__main__":
    main()
