"""How much RINE's scores move with the backbone's precision (fp16, bf16, float32) and the sigmoid's
(float32, as RINE computes it, or float64).

    python benchmarks/rine_scoring_precision.py --n-images 48

(`--arch tiny` runs the same on a tiny backbone in seconds, to check that the script works.)

    python benchmarks/rine_scoring_precision.py --n-images 48 --rine-weights model_2class_trainable.pth

With --rine-weights, one of RINE's released trainable files (github.com/mever-team/rine, ckpt/) is
used as it is; without it, random trainable weights in RINE's key format. The backbone is always a
randomly initialised CLIP ViT-L/14 (hidden 1024, 24 blocks, 16 heads, MLP 4096, patch 14, 224 px;
its weights stored in fp16, as OpenAI's CLIP weights are) and random trainable weights in RINE's key
format (d' 1024, NPROJ 2: RINE's 4-class setting), turned into a checkpoint by `import-rine`. The
last bias is shifted so that the logits centre on 0. Images are the demo's generated ones (half
"fakes"), centre-cropped as RINE does (TEST_CROP "rine").

Printed: for each pair of backbone precisions, the max and mean |difference| of P(fake) and the AP
of each; then, on the fp16 backbone's logits, float32 against float64 sigmoid, on the logits as they
are and multiplied by a factor (a head whose last layer is that many times larger: as confident as a
trained detector, whose logits reach tens).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rine_plus_ssca as rps  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "rine_plus_ssca.py"
ARCHITECTURES = {  # name -> (CLIPVisionConfig arguments, RINE's d')
    "vit-l14": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     patch_size=14, image_size=224, projection_dim=768), 1024),
    "tiny": (dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                  patch_size=32, image_size=224, projection_dim=64), 32),  # to check that the script runs
}


def save_random_backbone(folder, architecture, seed):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**architecture)).half().save_pretrained(folder)


def random_rine_weights(width, n_blocks, dim, nproj, seed):
    """Random tensors under RINE's keys (alpha ~ N(0, 1) as RINE initialises it, He-scaled weights)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"alpha": (1, n_blocks, dim)}
    for name in ("proj1", "proj2"):
        for i in range(nproj):  # [Dropout] + nproj x [Linear, ReLU, Dropout]
            shapes[f"{name}.{1 + 3 * i}.weight"] = (dim, width if name == "proj1" and i == 0 else dim)
            shapes[f"{name}.{1 + 3 * i}.bias"] = (dim,)
    shapes.update({"head.0.weight": (dim, dim), "head.0.bias": (dim,), "head.3.weight": (dim, dim),
                   "head.3.bias": (dim,), "head.6.weight": (1, dim), "head.6.bias": (1,)})
    return {key: torch.randn(shape, generator=generator) * (1.0 if key == "alpha" else
                                                            (2.0 / shape[-1]) ** 0.5 if key.endswith("weight") else 0.1)
            for key, shape in shapes.items()}


def import_rine(weights_file, out, backbone, amp):
    result = subprocess.run([sys.executable, str(SCRIPT), "import-rine", "--ckpt", str(weights_file), "--out", str(out),
                             "--clip-model", str(backbone), "--amp", amp], capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr)


def logits_of(checkpoint, backbone, paths, device):
    """Raw logits [N] of the imported model, with the script's own scoring path (score_items)."""
    model = rps.load_detector(checkpoint, clip_model=str(backbone), device=device)
    started = time.time()
    _, logit_of, unreadable = rps.score_items(model, [(path, 0, "") for path in paths], batch_size=8, num_workers=0)
    assert not unreadable
    dtype = next(model.backbone.parameters()).dtype
    del model
    return np.array([logit_of[path] for path in paths], dtype=np.float64), dtype, time.time() - started


def average_precision(labels, probs):
    from sklearn.metrics import average_precision_score

    return average_precision_score(labels, probs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=48, help="generated images, half of them 'fakes'")
    parser.add_argument("--arch", default="vit-l14", choices=sorted(ARCHITECTURES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--precisions", default="fp16,bf16,off", help="backbone precisions (AMP values) to compare")
    parser.add_argument("--confident-factor", type=float, default=None,
                        help="factor for the confident head (default: max |logit| becomes 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rine-weights", default=None, help="one of RINE's released *_trainable.pth files (default: "
                        "random weights of RINE's 4-class shapes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    precisions = [p for p in args.precisions.split(",") if p]

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        architecture, dim = ARCHITECTURES[args.arch]
        backbone = scratch / "random_backbone"
        save_random_backbone(backbone, architecture, args.seed)
        rng = np.random.default_rng(args.seed)
        labels = np.arange(args.n_images) % 2
        generators = ("nearest", "bilinear", "bicubic")
        paths = []
        for i, fake in enumerate(labels):
            path = scratch / f"image_{i:03d}.png"
            Image.fromarray(rps.make_demo_image(rng, bool(fake), generators[i % 3])).save(path)
            paths.append(str(path))

        if args.rine_weights:
            weights_file = Path(args.rine_weights)
            print(f"RINE's weights: {weights_file.name} (as released); backbone: random {args.arch}")
        else:
            state = random_rine_weights(architecture["hidden_size"], architecture["num_hidden_layers"], dim, 2, args.seed)
            weights_file = scratch / "model_trainable.pth"
            torch.save(state, weights_file)
            import_rine(weights_file, scratch / "centring.pth", backbone, "off")
            centring, _, _ = logits_of(scratch / "centring.pth", backbone, paths[:8], args.device)
            state["head.6.bias"] -= float(np.mean(centring))  # logits around 0: P(fake) neither 0 nor 1
            torch.save(state, weights_file)

        logits, dtypes = {}, {}
        for amp in precisions:
            import_rine(weights_file, scratch / f"rine_{amp}.pth", backbone, amp)
            logits[amp], dtypes[amp], seconds = logits_of(scratch / f"rine_{amp}.pth", backbone, paths, args.device)
            print(f"backbone {str(dtypes[amp]).replace('torch.', '')}: {len(paths)} images in {seconds:.0f} s; logits "
                  f"from {logits[amp].min():.2f} to {logits[amp].max():.2f} (std {logits[amp].std():.2f})")

    def probs(z, float32=True):
        return rps.probabilities_from_logits(z, float32=float32)

    print(f"\nP(fake) as RINE computes it (float32 sigmoid), {len(labels)} images:")
    for i, first in enumerate(precisions):
        for second in precisions[i + 1:]:
            difference = np.abs(probs(logits[first]) - probs(logits[second]))
            names = [str(dtypes[p]).replace("torch.", "") for p in (first, second)]
            print(f"  backbone {names[0]} vs {names[1]}: max |dP| {difference.max():.2e}, mean {difference.mean():.2e}; "
                  f"AP {average_precision(labels, probs(logits[first])):.6f} vs "
                  f"{average_precision(labels, probs(logits[second])):.6f}")

    reference = logits[precisions[0]]
    factor = args.confident_factor or 30.0 / np.abs(reference).max()
    print(f"\nsigmoid in float32 vs float64, on the {str(dtypes[precisions[0]]).replace('torch.', '')} backbone's logits:")
    for name, z in (("logits as they are", reference), (f"logits x {factor:.3g} (max |logit| "
                                                        f"{np.abs(reference).max() * factor:.1f})", reference * factor)):
        single, double = probs(z), probs(z, float32=False)
        difference = np.abs(single - double)
        print(f"  {name}: max |dP| {difference.max():.2e}, mean {difference.mean():.2e}; "
              f"P(fake) exactly 1.0 in float32: {int((single == 1.0).sum())}, in float64: {int((double == 1.0).sum())}; "
              f"AP {average_precision(labels, single):.6f} (float32) vs {average_precision(labels, double):.6f} (float64)")


if __name__ == "__main__":
    main()
