"""What a training view costs against decoding the image and taking its centre crop, on one core.

    python benchmarks/augment_cost.py --sizes 256,1024,2048 --views 40

For each size it writes one generated photo-like JPEG (quality 95) to a temporary folder and
measures the CPU time, per view (mean over `--views` seeds, the same seeds for every column):
  test          decode + centre crop (what evaluation does)
  train         decode + TrainAugment with the default BLUR_PROB/JPEG_PROB (blur and JPEG on a
                window around the crop)
  train_both    the same with blur and JPEG on every view (the worst case)
  whole_image   decode + the default augmentation applied to the whole image, as before the window
and the ratios train/test and whole_image/test. The window gives the same pixels as the whole
image would (tests/test_views_and_bias_report.py checks it); only the cost differs.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rine_plus_ssca as rps  # noqa: E402


def mean_ms(view_of, path, seeds):
    """Mean CPU milliseconds of decoding `path` and making one view, over the seeds (after one warm-up).
    CPU time of this process, not wall time, so other programs on a busy machine don't count."""
    view_of(rps.open_image(path), seeds[0])
    started = time.process_time()
    for seed in seeds:
        view_of(rps.open_image(path), seed)
    return (time.process_time() - started) / len(seeds) * 1000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,1024,2048", help="image sides in pixels, comma-separated")
    parser.add_argument("--views", type=int, default=40, help="views timed per size and column")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    cfg = rps.default_config()
    both = rps.default_config()
    both.BLUR_PROB = both.JPEG_PROB = 1.0
    centre = rps.build_transform(cfg, train=False)
    transforms = {
        "test": lambda image, seed: centre(image),
        "train": lambda image, seed, a=rps.TrainAugment(cfg): a(image, torch.Generator().manual_seed(seed)),
        "train_both": lambda image, seed, a=rps.TrainAugment(both): a(image, torch.Generator().manual_seed(seed)),
        "whole_image": lambda image, seed, a=rps.TrainAugment(cfg, whole_image=True): a(image, torch.Generator().manual_seed(seed)),
    }
    seeds = list(range(args.views))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in [int(s) for s in args.sizes.split(",")]:
            path = Path(folder) / f"photo_{size}.jpg"
            Image.fromarray(rps.make_demo_image(np.random.default_rng(size), fake=False, size=size)).save(path, quality=95)
            ms = {name: mean_ms(view_of, path, seeds) for name, view_of in transforms.items()}
            rows.append([f"{size} px JPEG"] + [ms[name] for name in transforms]
                        + [ms["train"] / ms["test"], ms["whole_image"] / ms["test"]])
    print(f"CPU milliseconds per view (mean of {args.views}), one thread; window margin {rps.TrainAugment(cfg).margin} px")
    print(rps.format_table(["image", "test ms", "train ms", "train_both ms", "whole_image ms", "train/test",
                            "whole_image/test"], [[row[0]] + [round(v, 2) for v in row[1:]] for row in rows]))


if __name__ == "__main__":
    main()
