"""Do OpenCV's and Pillow's JPEG encoders give different pixels at the same quality?

    pip install opencv-python-headless   # only for this measurement
    python benchmarks/jpeg_encoders.py                     # demo images and matplotlib's sample photo
    python benchmarks/jpeg_encoders.py --images a.png b.jpg --qualities 30 75 100

RINE's training augmentation re-encodes with OpenCV or Pillow at random. Each image is encoded
the way RINE calls them: OpenCV from BGR with IMWRITE_JPEG_QUALITY, imdecode, back to RGB;
Pillow with save(quality=...) and reopen. Prints, per image and quality: whether the JPEG files
are byte-identical, the mean absolute difference of the decoded pixels (0-255), the share of
pixel values that differ, and, for scale, the mean absolute change the encoding itself makes.
"""

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rine_plus_ssca as rps  # noqa: E402


def opencv_jpeg(pixels, quality):
    import cv2

    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(pixels[:, :, ::-1]), [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    assert ok
    return encoded.tobytes(), cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1]


def pillow_jpeg(pixels, quality):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def default_images():
    rng = np.random.default_rng(0)
    images = {f"demo {'fake' if fake else 'real'} {i}": rps.make_demo_image(rng, fake, "bilinear", 256)
              for i, fake in enumerate([False, False, True, True])}
    try:
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            images["grace_hopper.jpg (photo)"] = np.asarray(Image.open(f).convert("RGB"))
    except Exception:  # no matplotlib sample data: the demo images alone
        pass
    return images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", nargs="*", default=[], help="image files (default: demo images and a sample photo)")
    parser.add_argument("--qualities", type=int, nargs="+", default=[30, 100])
    args = parser.parse_args(argv)
    import cv2

    images = {Path(p).name: np.asarray(rps.load_rgb(p)) for p in args.images} or default_images()
    print(f"OpenCV {cv2.__version__}, Pillow {Image.__version__}")
    print(f"{'image':28s} {'quality':>7s} {'same bytes':>10s} {'mean |cv2-PIL|':>14s} {'values differ':>13s} "
          f"{'mean |PIL-original|':>19s}")
    for name, pixels in images.items():
        for quality in args.qualities:
            cv_bytes, cv_pixels = opencv_jpeg(pixels, quality)
            pil_bytes, pil_pixels = pillow_jpeg(pixels, quality)
            difference = np.abs(cv_pixels.astype(int) - pil_pixels.astype(int))
            change = np.abs(pil_pixels.astype(int) - pixels.astype(int)).mean()
            print(f"{name:28s} {quality:7d} {str(cv_bytes == pil_bytes):>10s} {difference.mean():14.3f} "
                  f"{(difference > 0).mean():13.1%} {change:19.3f}")


if __name__ == "__main__":
    main()
