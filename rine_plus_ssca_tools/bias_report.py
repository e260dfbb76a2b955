"""The bias report: differences between the real and the fake images that a detector could learn instead
of the generator's traces (file format, size, JPEG quality, colour mode), read from file headers only.

check-data prints it in full; training prints its warnings before the first epoch (print_shortcut_warnings).
"""

import functools
import random

import numpy as np
from PIL import Image


# The IJG (libjpeg) luminance quantisation table at quality 50, in natural (row-major) order;
# encoders scale it for other qualities, which is how a file's quality can be estimated.
IJG_LUMINANCE_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)


@functools.lru_cache(maxsize=None)
def ijg_luminance_tables():
    """Quality (1-100) -> the IJG luminance table libjpeg writes at that quality, as an array [64]."""
    base = np.array(IJG_LUMINANCE_TABLE)
    tables = {}
    for quality in range(1, 101):
        scale = 5000 // quality if quality < 50 else 200 - 2 * quality
        tables[quality] = np.clip((base * scale + 50) // 100, 1, 255)
    return tables


def jpeg_quality_estimate(quantization):
    """Estimated quality of a JPEG from its tables (PIL's image.quantization): the IJG quality whose
    luminance table is nearest. Files from other encoders get the nearest IJG equivalent."""
    table = np.array(list(quantization.get(0, next(iter(quantization.values())))))
    if table.size != 64:
        return None
    return min(ijg_luminance_tables().items(), key=lambda pair: (np.abs(pair[1] - table).sum(), -pair[0]))[0]  # ties: the higher


def image_header(path):
    """What opening a file tells without decoding its pixels: dict(width, height, format, mode,
    jpeg_quality); None when the file can't be opened."""
    try:
        with Image.open(path) as image:
            image_format = "JPEG" if image.format == "MPO" else image.format or "unknown"  # MPO: a phone's JPEG
            quantization = getattr(image, "quantization", None) if image_format == "JPEG" else None
            return dict(width=image.width, height=image.height, format=image_format, mode=image.mode,
                        jpeg_quality=jpeg_quality_estimate(quantization) if quantization else None)
    except Exception:
        return None


def header_summary(headers, crop_size):
    """Sizes, formats, JPEG qualities and colour modes of a list of image_header dicts."""
    n = len(headers)
    widths = np.array([h["width"] for h in headers])
    heights = np.array([h["height"] for h in headers])
    qualities = [h["jpeg_quality"] for h in headers if h["jpeg_quality"] is not None]

    def shares(key):
        counts = {}
        for h in headers:
            counts[h[key]] = counts.get(h[key], 0) + 1
        return {value: count / n for value, count in sorted(counts.items(), key=lambda pair: -pair[1])}

    return dict(n=n, widths=widths, heights=heights, shorter_median=float(np.median(np.minimum(widths, heights))),
                below_crop=float(np.mean(np.minimum(widths, heights) < crop_size)), formats=shares("format"),
                jpeg_share=sum(h["format"] == "JPEG" for h in headers) / n, modes=shares("mode"),
                jpeg_quality=float(np.median(qualities)) if qualities else None, n_jpeg_quality=len(qualities))


BIAS_SHARE_GAP = 0.3  # real and fake shares further apart than this are a shortcut worth a warning
BIAS_SIZE_RATIO = 2.0  # ... and median shorter sides this many times apart
BIAS_QUALITY_GAP = 10  # ... and median JPEG qualities this far apart


def shortcut_warnings(real, fake, crop_size):
    """Warnings, one line each, for differences between the real and fake header summaries that a
    detector could learn instead of the generator's traces; [] when the classes look alike."""
    found = []

    def largest_gap(key):
        values = set(real[key]) | set(fake[key])
        gaps = [(abs(real[key].get(v, 0) - fake[key].get(v, 0)), v) for v in values]
        return max(gaps, key=lambda pair: (round(pair[0], 6), pair[1] == "JPEG"), default=(0, None))  # ties: name JPEG

    gap, image_format = largest_gap("formats")
    if gap > BIAS_SHARE_GAP:
        found.append(f"{real['formats'].get(image_format, 0):.0%} of real images are {image_format}, "
                     f"{fake['formats'].get(image_format, 0):.0%} of fakes: the detector can learn the file format; "
                     "re-encode both classes the same way, or keep JPEG augmentation on (JPEG_PROB 0.5 or more).")
    if abs(real["below_crop"] - fake["below_crop"]) > BIAS_SHARE_GAP:
        found.append(f"{real['below_crop']:.0%} of real images and {fake['below_crop']:.0%} of fakes are smaller than the "
                     f"{crop_size} px crop: the detector can learn the image size from the padding; drop the small "
                     "images or add small images of the other class.")
    ratio = max(real["shorter_median"], fake["shorter_median"]) / max(1.0, min(real["shorter_median"], fake["shorter_median"]))
    if ratio >= BIAS_SIZE_RATIO:
        found.append(f"real images have a median shorter side of {real['shorter_median']:.0f} px, fakes "
                     f"{fake['shorter_median']:.0f} px: the detector can learn the image size (how much of the scene a "
                     "crop shows); pick images of similar size for both classes.")
    if real["jpeg_quality"] is not None and fake["jpeg_quality"] is not None \
            and abs(real["jpeg_quality"] - fake["jpeg_quality"]) >= BIAS_QUALITY_GAP:
        found.append(f"real JPEGs have median quality {real['jpeg_quality']:.0f}, fake JPEGs {fake['jpeg_quality']:.0f}: "
                     "the detector can learn the compression strength; re-encode both classes at the same quality, "
                     "or keep JPEG augmentation on.")
    gap, mode = largest_gap("modes")
    if gap > BIAS_SHARE_GAP:
        found.append(f"{real['modes'].get(mode, 0):.0%} of real images and {fake['modes'].get(mode, 0):.0%} of fakes are "
                     f"stored in colour mode {mode}: the detector can learn the colour conversion (grey, palette, "
                     "alpha); convert both classes to RGB the same way.")
    return found


def print_shortcut_warnings(items, crop_size, seed, per_class=2000, write=print):
    """The shortcut warnings of check-data (rine_plus_ssca_tools/data_check.py) for a training set, from file
    headers only (no decoding); a seeded sample of `per_class` images per class stands for a larger set."""
    rng = random.Random(seed)
    sample = []
    for label in (0, 1):
        members = [item for item in items if item[1] == label]
        sample += rng.sample(members, per_class) if len(members) > per_class else members
    headers = [image_header(path) for path, _, _ in sample]  # None: unreadable, left out
    real = [header for item, header in zip(sample, headers) if header is not None and item[1] == 0]
    fake = [header for item, header in zip(sample, headers) if header is not None and item[1] == 1]
    found = []
    if real and fake:
        found = shortcut_warnings(header_summary(real, crop_size), header_summary(fake, crop_size), crop_size)
    for line in found:
        write(f"warning: possible shortcut: {line} (run check-data for the full report)")
    return found
