"""The check-data command: scan a folder tree without training, and report what a detector could learn
instead of the generators' traces (the bias report).

    python rine_plus_ssca.py check-data --data data/train

Training itself warns of the same shortcuts through the script's print_shortcut_warnings, which needs
nothing from here.
"""

import os
import sys
from pathlib import Path

import numpy as np

from rine_plus_ssca import (CROP_SIZE, IMAGE_EXTENSIONS, OneLineErrorParser, UserError, check_numbers, count_of,
                            count_table, format_table, open_image, scan_image_folder)
from rine_plus_ssca_tools.bias_report import header_summary, image_header, shortcut_warnings


BIAS_COLUMNS = ["images", "n", "width min/med/max", "height min/med/max", "under crop", "formats", "JPEG",
                "JPEG quality (median)", "colour modes"]


def summary_row(name, summary, crop_size):
    """One row of the bias report table."""
    def spread(values):
        return f"{values.min()}/{int(np.median(values))}/{values.max()}"

    def top(shares):
        return ",".join(f"{value} {share:.0%}" for value, share in list(shares.items())[:3])

    quality = "-" if summary["jpeg_quality"] is None else f"{summary['jpeg_quality']:.0f}"
    return (name, summary["n"], spread(summary["widths"]), spread(summary["heights"]), f"{summary['below_crop']:.0%}",
            top(summary["formats"]), f"{summary['jpeg_share']:.0%}", quality, top(summary["modes"]))


def bias_report(items, headers, crop_size):
    """(table rows per label and per generator folder, shortcut warnings) from items and their
    image_header dicts (None for unreadable files, left out)."""
    groups = {}
    for (_, label, group), header in zip(items, headers):
        if header is not None:
            groups.setdefault(("all", label), []).append(header)
            groups.setdefault((group, label), []).append(header)
    summaries = {key: header_summary(members, crop_size) for key, members in groups.items()}
    rows = []
    for group in ["all"] + sorted({group for group, _ in summaries if group != "all"}):
        for label, name in ((0, "real"), (1, "fake")):
            if (group, label) in summaries:
                rows.append(summary_row(f"{name}" if group == "all" else f"{group} {name}", summaries[(group, label)],
                                        crop_size))
    both = ("all", 0) in summaries and ("all", 1) in summaries
    return rows, shortcut_warnings(summaries[("all", 0)], summaries[("all", 1)], crop_size) if both else []


def build_check_data_parser():
    """Options of the check-data command."""
    parser = OneLineErrorParser(prog="rine_plus_ssca.py check-data", allow_abbrev=False,
                                description="Scan a folder tree without training: unreadable, tiny and unlabeled files, label counts, and a bias report (sizes, formats, JPEG qualities, colour modes of real vs fake) that warns of shortcuts.")
    parser.add_argument("--data", required=True, help="folder to scan, e.g. data/train or data")
    parser.add_argument("--min-side", type=int, default=64, help="images with a side shorter than this are listed as tiny")
    parser.add_argument("--crop-size", type=int, default=CROP_SIZE,
                        help="the training crop (CROP_SIZE): the bias report counts images smaller than it")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel decoding processes")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def inspect_image(path):
    """(path, width, height, error text or None, image_header or None): the full decode a training run would do."""
    try:
        header = image_header(path)
        image = open_image(path)
        return path, image.width, image.height, None, header
    except Exception as error:
        return path, 0, 0, f"{type(error).__name__}: {error}", None


def run_check_data(args):
    """The check-data command; exit code 1 when unreadable images were found or no image is labelled."""
    check_numbers(args)
    from concurrent.futures import ProcessPoolExecutor

    root = Path(args.data)
    if not root.is_dir():
        raise UserError(f"No folder {root}; pass --data with the folder to check.")
    items, unlabeled = scan_image_folder(root)
    others = [str(p) for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS
              and not p.name.startswith(".")]
    paths = [item[0] for item in items] + unlabeled
    print(f"checking {count_of(len(paths), 'image file')} under {root} with {args.workers} processes ...")
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        results = list(pool.map(inspect_image, paths, chunksize=64))
    unreadable = [(path, error) for path, _, _, error, _ in results if error]
    tiny = [(path, w, h) for path, w, h, error, _ in results if not error and min(w, h) < args.min_side]
    print(f"\nlabel counts per folder (under {root}):")
    print(format_table(["folder", "real", "fake"], count_table(items)))
    if items:
        rows, found = bias_report(items, [result[4] for result in results[:len(items)]], args.crop_size)
        print(f"\nbias report (readable images; 'under crop': a side under the {args.crop_size} px crop, mirror-padded):")
        print(format_table(BIAS_COLUMNS, rows))
        print(f"possible shortcuts (real and fake differ): {len(found)}")
        for line in found:
            print(f"  warning: {line}")
    print(f"\nunreadable images: {len(unreadable)}")
    for path, error in unreadable:
        print(f"  {path}  ({error})")
    print(f"tiny images (a side under {args.min_side} px, padded to the crop): {len(tiny)}")
    for path, w, h in tiny:
        print(f"  {path}  ({w}x{h})")
    print(f"unlabeled images (in no 0_real/real/nature or 1_fake/fake/ai folder, ignored): {len(unlabeled)}")
    for path in unlabeled:
        print(f"  {path}")
    print(f"files without an image extension (ignored): {len(others)}")
    for path in others[:20]:
        print(f"  {path}")
    if len(others) > 20:
        print(f"  ... and {len(others) - 20} more")
    if not items:
        print(f"error: no labelled images under {root}; put them in 0_real/real/nature and 1_fake/fake/ai folders.",
              file=sys.stderr)
    if unreadable:  # the exit code is 1: the last line says why
        print(f"error: {count_of(len(unreadable), 'image')} under {root} cannot be read (listed above under 'unreadable "
              "images'); delete or re-download them. Training skips them, but stops when more than MAX_BAD_FRACTION "
              "of a split cannot be read.", file=sys.stderr)
    return 1 if unreadable or not items else 0


COMMANDS = {"check-data": (build_check_data_parser, run_check_data)}  # what the script's main runs
