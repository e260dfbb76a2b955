"""How much of the spectral stem's input lies where log1p is nearly linear, on CLIP-normalised
pixels (the DCT's scale before checkpoint format 3) and on 0-255 pixels (since).

    python benchmarks/dct_scale.py --data data/demo/test

For the centre crop of every image under `--data` (at most `--n`), the 8x8 block DCT of each colour
channel is taken on both scales. "High frequency" means u + v >= 8 (28 of the 64 frequencies).
Printed per scale: the share of high-frequency |c| below 0.1 (there log1p(|c|)/|c| > 0.95: the log
changes almost nothing), the median |c|, and the mean over the 192 channels of the correlation
between log1p|c| and |c| (1.0: the log is a linear rescaling that BatchNorm undoes).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rine_plus_ssca as rps  # noqa: E402


def block_dct(pixels):
    """[B,3,H,W] -> |coefficients| [B,192,H/8,W/8], channel c*64 + 8u + v."""
    basis = rps.dct_matrix(8)
    filters = torch.einsum("ui,vj->uvij", basis, basis).reshape(64, 1, 8, 8).repeat(3, 1, 1, 1)
    return F.conv2d(pixels.float(), filters, stride=8, groups=3).abs()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="image folder (labels from folder names), e.g. data/demo/test")
    parser.add_argument("--n", type=int, default=400, help="images used at most")
    args = parser.parse_args(argv)
    items, _ = rps.scan_image_folder(args.data)
    transform = rps.build_transform(rps.default_config(), train=False)
    uint8 = torch.stack([transform(rps.open_image(path)) for path, _, _ in items[:args.n]])
    scales = {"CLIP-normalised": rps.normalise_uint8(uint8), "0-255": uint8.float()}
    u, v = np.divmod(np.arange(64), 8)
    high = torch.from_numpy(np.tile(u + v >= 8, 3))
    print(f"{len(uint8)} centre crops from {args.data}; high frequency: u + v >= 8")
    for name, pixels in scales.items():
        magnitudes = block_dct(pixels)
        high_frequency = magnitudes[:, high].flatten()
        per_channel = magnitudes.permute(1, 0, 2, 3).flatten(1).double()  # [192, values]
        logged = torch.log1p(per_channel)
        centred, centred_log = per_channel - per_channel.mean(1, keepdim=True), logged - logged.mean(1, keepdim=True)
        correlation = (centred * centred_log).sum(1) / (centred.norm(dim=1) * centred_log.norm(dim=1))
        print(f"{name:>16}: |c| < 0.1 for {(high_frequency < 0.1).double().mean():.1%} of high-frequency inputs, "
              f"median |c| {high_frequency.median():.3f}; corr(log1p|c|, |c|) per channel: mean "
              f"{correlation.mean():.3f}, min {correlation.min():.3f}")


if __name__ == "__main__":
    main()
