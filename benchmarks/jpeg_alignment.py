"""P(fake) of real images as PNG and as JPEG, with the crop on the JPEG's 8x8 grid and off it.

    python benchmarks/jpeg_alignment.py --ckpt checkpoints/demo/best_rine_plus_ssca.pth --data data/demo/test

Takes the first `--n` images in the 0_real/real/nature folders under `--data` and, for each,
the same image saved as JPEG (`--quality`, default 75). Every image is cut to one CROP_SIZE
window before the script sees it: at (16, 16), on the JPEG's 8-pixel grid ("aligned"), and at
(16 + shift, 16 + shift) ("misaligned", `--shift` 3 by default), so every script version
evaluates exactly the same pixels. Prints mean P(fake) and the share called fake per column.
`--script` loads another version of rine_plus_ssca.py (e.g. an older one with its own checkpoint).
"""

import argparse
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def load_script(path):
    spec = importlib.util.spec_from_file_location("rine_plus_ssca", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rine_plus_ssca"] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by the script given in --script")
    parser.add_argument("--data", required=True, help="folder with real images (in 0_real/real/nature folders)")
    parser.add_argument("--script", default=str(Path(__file__).resolve().parent.parent / "rine_plus_ssca.py"))
    parser.add_argument("--n", type=int, default=20, help="real images used")
    parser.add_argument("--quality", type=int, default=75, help="JPEG quality")
    parser.add_argument("--shift", type=int, default=3, help="pixels the misaligned window is moved by (1-7)")
    args = parser.parse_args(argv)

    rps = load_script(args.script)
    model = rps.load_detector(args.ckpt, device="cpu")
    crop = model.config["CROP_SIZE"]
    items, _ = rps.scan_image_folder(args.data)
    paths = [path for path, label, _ in items if label == 0][:args.n]
    columns = {}
    for name, offset in (("aligned", 16), ("misaligned", 16 + args.shift)):
        for kind in ("PNG", f"JPEG q{args.quality}"):
            windows = []
            for path in paths:
                image = rps.open_image(path)
                if kind != "PNG":
                    buffer = io.BytesIO()
                    image.save(buffer, format="JPEG", quality=args.quality)
                    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
                windows.append(image.crop((offset, offset, offset + crop, offset + crop)))
            columns[f"{kind} {name}"] = rps.predict(model, windows)
    print(f"{len(paths)} real images from {args.data}; checkpoint {args.ckpt} (script {args.script})")
    width = max(len(name) for name in columns)
    for name, probs in columns.items():
        print(f"{name.ljust(width)}  mean P(fake) {np.mean(probs):.4f}  median {np.median(probs):.4f}  "
              f"max {np.max(probs):.4f}  called fake {np.mean(probs >= 0.5):.0%}")


if __name__ == "__main__":
    main()
