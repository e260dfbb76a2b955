"""Which heatmap finds a generated square pasted into a real photo: every method tried, and two controls.

    python rine_plus_ssca.py --demo        # once: the demo checkpoint
    python benchmarks/localisation.py --ckpt checkpoints/demo/best_rine_plus_ssca.pth

Each of --n images (default 50, seeded) is a demo 'photo' with a square a third of the crop's side (1/9 of
its area) cut from a demo fake and pasted at a random place in the centre crop
(rine_plus_ssca_tools/heatmaps.py, make_spliced_demo_image).
A method hits when its map is highest inside the square; a random point does so 11% of the time.

Methods (maps on the crop's 8x8 cells, or on pixels averaged over them):
  spectral tokens   heatmaps.explain: the head's logit for each spectral token as if the whole map were it
  windows           its method without the spectral branch: 32x32 windows mirror-tiled and scored
  occlusion         logit drop when a 32x32 window (stride 16) is replaced by noise of its own mean and spread
  grad-cam          ReLU(sum over channels of gradient x activation) on the SSCA output map
  attention         z_clip's cross-attention weights over the spectral tokens, mean over heads
  spatial gate      the SSCA spatial gate
  input gradient    |gradient x input| of the pixels (through the spectral branch; CLIP runs without gradients)
Controls for heatmaps.explain: the same images scored by an untrained head of the same shape (a map that
does not depend on what the model learned explains nothing), a square cut from another real photo (nothing
generated to find: about 11% expected), and squares from the other demo generators.
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


def spliced_images(n, generator, seed):
    """[(uint8 image, (left, top, side))]; generator "real" pastes a square from another real photo."""
    rng = np.random.default_rng(seed)
    return [heatmaps.make_spliced_demo_image(rng, None if generator == "real" else generator) for _ in range(n)]


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


def script_method(model, crop, pixels):
    return torch.from_numpy(heatmaps.explain(model, rps.Image.fromarray(crop))[0].local_logits)


def windows(model, crop, pixels):
    return heatmaps.window_logits(model, crop)


SPECTRAL_ONLY = {"grad-cam", "attention", "spatial gate", "input gradient"}
METHODS = {"spectral tokens": script_method, "windows": windows, "occlusion": occlusion, "grad-cam": grad_cam,
           "attention": attention_weights, "spatial gate": spatial_gate, "input gradient": input_gradient}


def hit_rate(model, method, images):
    """(share of images whose map peaks inside the square, seconds per image)."""
    hits, started = 0, time.perf_counter()
    for image, (left, top, side) in images:
        crop, pixels = centre_crop_pixels(model, image)
        cells = method(model, crop, pixels).detach().float().numpy()
        x, y = heatmaps.peak_of(heatmaps.Explanation(crop=crop, local_logits=cells))
        hits += left <= x < left + side and top <= y < top + side
    return hits / len(images), (time.perf_counter() - started) / len(images)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default="checkpoints/demo/best_rine_plus_ssca.pth", help="the demo's checkpoint")
    parser.add_argument("--n", type=int, default=50, help="spliced images per row")
    parser.add_argument("--generator", default="bilinear", help="demo generator the squares are cut from")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not Path(args.ckpt).is_file():
        sys.exit(f"error: {args.ckpt} not found; run `python rine_plus_ssca.py --demo` first (or pass --ckpt).")
    torch.manual_seed(args.seed)
    model = rps.load_detector(args.ckpt, device="cpu")
    images = spliced_images(args.n, args.generator, args.seed)
    print(f"{args.n} demo photos, each with a {images[0][1][2]} px square from a '{args.generator}' fake "
          f"(1/9 of the crop); a random point hits 11%. Checkpoint {args.ckpt}.\n")
    print(f"{'method':<56} {'hits':>5}  {'ms/image':>8}")
    for name in args.methods.split(","):
        if name in SPECTRAL_ONLY and not model.use_spectral:
            print(f"{name:<56} {'n/a':>5}  (needs the spectral branch)")
            continue
        rate, seconds = hit_rate(model, METHODS[name], images)
        print(f"{name:<56} {rate:5.2f}  {1000 * seconds:8.0f}", flush=True)

    chosen = "spectral tokens" if model.use_spectral else "windows"
    untrained = rps.build_model(untrained_config(model, args.ckpt), torch.device("cpu")).eval()
    rate, seconds = hit_rate(untrained, METHODS[chosen], images)
    print(f"{'control: ' + chosen + ', untrained head':<56} {rate:5.2f}  {1000 * seconds:8.0f}")
    for generator in ["real"] + [g for g in rps.DEMO_LAYOUT["test"] if g != args.generator]:
        rate, seconds = hit_rate(model, METHODS[chosen], spliced_images(args.n, generator, args.seed + 1))
        print(f"{'control: ' + chosen + ', square from ' + generator:<56} {rate:5.2f}  {1000 * seconds:8.0f}")


def untrained_config(model, checkpoint_path):
    """The model's configuration, its backbone found as load_detector finds it."""
    cfg = rps.default_config()
    cfg.__dict__.update(model.config)
    cfg.CLIP_MODEL = rps.resolve_backbone_location(cfg.CLIP_MODEL, checkpoint_path,
                                                   rps.read_checkpoint(checkpoint_path).get("backbone_folder"))
    return cfg


if __name__ == "__main__":
    main()
