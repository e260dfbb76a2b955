"""Benchmark protocols: JSON files (protocols/*.json) that name each row of an eval table and its folders.

`python rine_plus_ssca.py eval --protocol protocols/rine20.json --data data/test` reads one with
read_protocol, and collect_test_items lists its images with protocol_items.
"""

import json
import os
import sys
from pathlib import Path

from rine_plus_ssca import UserError, scan_image_folder


PROTOCOL_KEYS = {"description", "real_dir", "rows"}
PROTOCOL_ROW_KEYS = {"name", "folder", "fake", "real", "expected"}


def read_protocol(path):
    """A protocol file (JSON): the rows of the table, in order, and the folders of each.

        {"description": "...", "real_dir": "../RAISEpng",
         "rows": [{"name": "progan", "folder": "progan"},
                  {"name": "diffusion_datasets/guided", "fake": "diffusion_datasets/guided/1_fake",
                   "real": "diffusion_datasets/imagenet/0_real"}]}

    Paths are relative to --data. "folder": labels from the label folders inside (0_real/1_fake,
    real/fake, nature/ai), categories merged; "fake" / "real": every image below is of that class,
    no label folders needed. Each is one path or a list. A path starting with "{real_dir}" starts
    at the protocol's real_dir (relative to --data), or at --real-dir when that is given.
    "expected" (optional): the row's image count per class as the benchmark publishes it,
    e.g. {"real": 1000, "fake": 1000}; eval notes a row whose count differs (expected_count_notes).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No protocol file {path}; the shipped ones are protocols/rine20.json, protocols/synthbuster.json "
                        "and protocols/genimage.json.")
    try:
        protocol = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); see protocols/rine20.json for the format.")
    if not isinstance(protocol, dict) or not isinstance(protocol.get("rows"), list) or not protocol["rows"]:
        raise UserError(f"{path} has no \"rows\" list; see protocols/rine20.json for the format.")
    if set(protocol) - PROTOCOL_KEYS:
        raise UserError(f"{path}: unknown key {sorted(set(protocol) - PROTOCOL_KEYS)[0]!r}; a protocol has {sorted(PROTOCOL_KEYS)}.")
    names = set()
    for number, row in enumerate(protocol["rows"], 1):
        where = f"{path}, row {number}"
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or not row["name"]:
            raise UserError(f"{where}: a row is an object with a \"name\" and its folders, e.g. {{\"name\": \"progan\", \"folder\": \"progan\"}}.")
        if set(row) - PROTOCOL_ROW_KEYS:
            raise UserError(f"{where} ({row['name']}): unknown key {sorted(set(row) - PROTOCOL_ROW_KEYS)[0]!r}; a row has {sorted(PROTOCOL_ROW_KEYS)}.")
        for key in ("folder", "fake", "real"):
            value = row.get(key, [])
            if not (isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise UserError(f"{where} ({row['name']}): \"{key}\" must be a folder path or a list of them.")
        expected = row.get("expected")
        if expected is not None and not (isinstance(expected, dict) and expected and set(expected) <= {"real", "fake"}
                                         and all(type(n) is int and n >= 0 for n in expected.values())):
            raise UserError(f"{where} ({row['name']}): \"expected\" is the row's image count per class, "
                            "e.g. {\"real\": 1000, \"fake\": 1000}.")
        if not any(row.get(key) for key in ("folder", "fake", "real")):
            raise UserError(f"{where} ({row['name']}): give its images as \"folder\", or as \"fake\" and \"real\" folders.")
        if row["name"] in names:
            raise UserError(f"{where}: the name {row['name']!r} is used twice.")
        names.add(row["name"])
    return protocol


def protocol_items(data_dir, protocol, real_dir=None, source="the protocol"):
    """Items of each protocol row, in the protocol's order.

    A row none of whose own folders ("folder", "fake") exists is left out, and a missing real
    folder leaves its rows with fakes only; both are named in a warning. A user with part of a
    benchmark still gets a table of that part.
    """
    if real_dir is not None and "real_dir" not in protocol:
        raise UserError(f"--real-dir has no use with {source}: its rows name their own real folders under --data.")
    shared_reals = Path(real_dir) if real_dir is not None else (
        data_dir / protocol["real_dir"] if "real_dir" in protocol else None)

    def locate(folder):
        if folder == "{real_dir}" or folder.startswith("{real_dir}/"):
            if shared_reals is None:
                raise UserError(f"{source} uses {{real_dir}} but sets no \"real_dir\"; give the folder with --real-dir.")
            return Path(os.path.normpath(shared_reals / folder[len("{real_dir}"):].lstrip("/")))
        return Path(os.path.normpath(data_dir / folder))

    scans, missing = {}, {}

    def images_of(row, key, label):
        """(image, label, row name) for the row's folders under `key`; label None: from its label folders."""
        found = []
        folders = row.get(key, [])
        for path in map(locate, [folders] if isinstance(folders, str) else folders):
            if not path.is_dir():
                missing.setdefault(str(path), []).append(row["name"])
                continue
            if path not in scans:
                scans[path] = scan_image_folder(path)
            labelled, unlabeled = scans[path]
            if label is None:
                found += [(image, image_label, row["name"]) for image, image_label, _ in labelled]
                continue
            opposite = [image for image, image_label, _ in labelled if image_label != label]
            if opposite:
                kind, other = ("fake", "real") if label else ("real", "fake")
                raise UserError(f"{source} gives {path} as {kind} images of {row['name']}, but {opposite[0]} is in a {other} folder.")
            found += [(image, label, row["name"]) for image in sorted([i for i, _, _ in labelled] + unlabeled)]
        return found

    items, absent_rows = [], []
    for row in protocol["rows"]:
        own = images_of(row, "folder", None) + images_of(row, "fake", 1)
        if not own:  # its shared reals alone say nothing about this generator
            absent_rows.append(row["name"])
            continue
        items += own + images_of(row, "real", 0)
    missing = {path: rows for path, rows in missing.items() if set(rows) - set(absent_rows)}
    if absent_rows and len(absent_rows) < len(protocol["rows"]):
        print(f"warning: {len(absent_rows)} of the {len(protocol['rows'])} rows of {source} have no images under {data_dir} "
              f"and are left out: {', '.join(absent_rows)}", file=sys.stderr)
    for path, rows in missing.items():
        print(f"warning: no folder {path}, named by {source} for {', '.join(rows)}", file=sys.stderr)
    return items


def expected_count_notes(protocol, items):
    """One line per protocol row whose image count differs from its "expected" count, the one the
    benchmark publishes: a partial download or stray files change what the row's numbers mean.
    Rows with no images at all are left out (protocol_items warns about those)."""
    found = {}
    for _, label, row in items:
        counts = found.setdefault(row, {"real": 0, "fake": 0})
        counts["fake" if label else "real"] += 1
    notes = []
    for row in protocol["rows"]:
        expected, counts = row.get("expected"), found.get(row["name"])
        if expected and counts and any(counts[kind] != n for kind, n in expected.items()):
            have = " and ".join(f"{counts[kind]} {kind}" for kind in expected)
            want = " and ".join(f"{n} {kind}" for kind, n in expected.items())
            notes.append(f"{row['name']} has {have} images where the benchmark has {want}.")
    return notes
