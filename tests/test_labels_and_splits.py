"""Labels from folder names, class filtering, the hold-out split, and data mistakes explained."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rine_plus_ssca as rps
from conftest import nonempty_lines, run_main


def touch_images(root, relative_paths):
    """Empty files are enough for scanning: labels come from paths, not pixels."""
    for rel in relative_paths:
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def labels_by_relpath(root):
    items, unlabeled = rps.scan_image_folder(root)
    rel = lambda p: Path(p).relative_to(root).as_posix()  # noqa: E731
    return {rel(path): (label, group) for path, label, group in items}, sorted(rel(p) for p in unlabeled)


def generator_of(group):
    """The generator a group belongs to: its first folder ('biggan/cat' -> 'biggan')."""
    return group.split("/")[0]


def test_cnndetection_layout(tmp_path):
    touch_images(tmp_path, ["car/0_real/a.png", "car/1_fake/b.png", "cat/0_real/c.jpg", "cat/1_fake/d.JPEG"])
    labelled, unlabeled = labels_by_relpath(tmp_path)
    assert labelled == {"car/0_real/a.png": (0, "car"), "car/1_fake/b.png": (1, "car"),
                        "cat/0_real/c.jpg": (0, "cat"), "cat/1_fake/d.JPEG": (1, "cat")}
    assert unlabeled == []


def test_flat_real_fake_layout_is_not_alphabetical(tmp_path):
    # Alphabetically 'fake' < 'real' (ImageFolder would call fake 0); the name decides instead.
    touch_images(tmp_path, ["fake/x.png", "real/y.png"])
    labelled, _ = labels_by_relpath(tmp_path)
    assert labelled == {"fake/x.png": (1, "."), "real/y.png": (0, ".")}


def test_genimage_layout_is_not_alphabetical(tmp_path):
    # 'ai' < 'nature' alphabetically; ai must still be fake (1) and nature real (0).
    touch_images(tmp_path, ["sdv4/ai/1.png", "sdv4/nature/2.png", "midjourney/ai/3.png", "midjourney/nature/4.png"])
    labelled, _ = labels_by_relpath(tmp_path)
    assert labelled == {"sdv4/ai/1.png": (1, "sdv4"), "sdv4/nature/2.png": (0, "sdv4"),
                        "midjourney/ai/3.png": (1, "midjourney"), "midjourney/nature/4.png": (0, "midjourney")}


def test_label_folders_are_case_insensitive(tmp_path):
    touch_images(tmp_path, ["g/Real/a.png", "g/FAKE/b.png", "h/AI/c.png", "h/Nature/d.png", "i/0_REAL/e.png", "i/1_Fake/f.png"])
    labelled, _ = labels_by_relpath(tmp_path)
    assert {k: v[0] for k, v in labelled.items()} == {
        "g/Real/a.png": 0, "g/FAKE/b.png": 1, "h/AI/c.png": 1, "h/Nature/d.png": 0, "i/0_REAL/e.png": 0, "i/1_Fake/f.png": 1}


def test_nested_layouts_name_the_generator(tmp_path):
    # ForenSynths test sets nest <generator>/<category>/0_real|1_fake; GenImage has <gen>/train/ai.
    touch_images(tmp_path, ["biggan/cat/1_fake/a.png", "biggan/cat/0_real/b.png", "sdv4/train/ai/c.png",
                            "sdv4/train/nature/d.png", "fake/extra/deeper/e.png"])
    labelled, _ = labels_by_relpath(tmp_path)
    assert labelled["biggan/cat/1_fake/a.png"] == (1, "biggan/cat")
    assert labelled["biggan/cat/0_real/b.png"] == (0, "biggan/cat")
    assert labelled["sdv4/train/ai/c.png"] == (1, "sdv4/train")
    assert labelled["sdv4/train/nature/d.png"] == (0, "sdv4/train")
    assert labelled["fake/extra/deeper/e.png"] == (1, ".")  # the label folder may sit above sub-folders
    assert generator_of("biggan/cat") == "biggan" and generator_of("sdv4/train") == "sdv4"


def test_nearest_label_folder_above_an_image_decides(tmp_path):
    touch_images(tmp_path, ["real/fake/a.png", "fake/real/b.png", "0_real/1_fake/c.png", "1_fake/nature/d.png",
                            "real/sub/ai/e.png"])
    labelled, _ = labels_by_relpath(tmp_path)
    assert {k: v[0] for k, v in labelled.items()} == {
        "real/fake/a.png": 1, "fake/real/b.png": 0, "0_real/1_fake/c.png": 1, "1_fake/nature/d.png": 0, "real/sub/ai/e.png": 1}
    assert rps.label_from_parts(("x", "real", "y", "fake", "z")) == (1, 3)
    assert rps.label_from_parts(("x", "realistic", "fakes")) == (None, None)  # whole names only


def test_images_outside_label_folders_are_reported_unlabeled(tmp_path):
    touch_images(tmp_path, ["car/0_real/a.png", "car/1_fake/b.png", "misc/c.png", "d.png", "realistic/e.png",
                            "car/0_real/notes.txt"])
    labelled, unlabeled = labels_by_relpath(tmp_path)
    assert set(labelled) == {"car/0_real/a.png", "car/1_fake/b.png"}  # the .txt is no image
    assert unlabeled == ["d.png", "misc/c.png", "realistic/e.png"]


def test_filter_classes_matches_whole_folder_names():
    items = [("a", 0, "car"), ("b", 1, "car"), ("c", 0, "cat"), ("d", 1, "carrot"), ("e", 1, "biggan/chair"),
             ("f", 0, "horse")]
    kept = rps.filter_classes(items, "car, chair")
    assert [i[0] for i in kept] == ["a", "b", "e"]  # 'carrot' is not 'car'; nested 'chair' counts
    assert rps.filter_classes(items, "") == items
    assert rps.filter_classes(items, "dog") == []


def _holdout_items():
    items = []
    for group, n_real, n_fake in (("car", 40, 20), ("cat", 10, 30), ("dog", 7, 3)):
        items += [(f"{group}/r{i}", 0, group) for i in range(n_real)]
        items += [(f"{group}/f{i}", 1, group) for i in range(n_fake)]
    return items


def test_stratified_holdout_is_disjoint_stratified_and_seeded():
    items = _holdout_items()
    train, val = rps.stratified_holdout(items, 0.2, seed=0)
    assert sorted(train + val) == sorted(items)  # a partition: nothing lost, nothing twice
    assert not set(train) & set(val)
    strata = Counter((i[2], i[1]) for i in items)
    val_strata = Counter((i[2], i[1]) for i in val)
    for key, n in strata.items():
        assert val_strata[key] == round(0.2 * n), key  # every (group, label) in proportion

    again_train, again_val = rps.stratified_holdout(items, 0.2, seed=0)
    assert again_val == val and again_train == train
    other_train, other_val = rps.stratified_holdout(items, 0.2, seed=1)
    assert set(other_val) != set(val)
    assert Counter((i[2], i[1]) for i in other_val) == val_strata


def _write_pngs(root, relative_dirs, n=3, size=32):
    rng = np.random.default_rng(0)
    for rel in relative_dirs:
        folder = Path(root) / rel
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def assert_one_line_error(result, *fragments):
    output = result.stdout + result.stderr
    assert result.returncode not in (0, 2), output  # 2 is argparse's; this is a data mistake
    assert "Traceback" not in output, output
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _train_args(data_dir, backbone):
    return ["--data-dir", data_dir, "--clip-model", backbone, "--device", "cpu", "--num-workers", "0",
            "--proj-dim", "16", "--spec-channels", "8", "--fusion-dim", "16", "--fusion-heads", "2",
            "--checkpoint-dir", "ckpt"]


def test_one_class_training_set_is_refused_with_one_line(tmp_path, tiny_backbone):
    _write_pngs(tmp_path / "data/train", ["car/0_real", "cat/0_real"])
    result = run_main(_train_args("data", tiny_backbone), cwd=tmp_path)
    assert_one_line_error(result, "fake")
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").glob("*.pth"))


def test_one_class_validation_set_is_refused_with_one_line(tmp_path, tiny_backbone):
    _write_pngs(tmp_path / "data/train", ["car/0_real", "car/1_fake"])
    _write_pngs(tmp_path / "data/val", ["car/1_fake"])
    result = run_main(_train_args("data", tiny_backbone), cwd=tmp_path)
    assert_one_line_error(result, "validation", "real")


def test_train_classes_filter_applies_before_training(tmp_path, tiny_backbone):
    # 'car' has both classes, 'cat' only reals: selecting cat alone must be refused as one-class,
    # which can only happen if the filter was applied.
    _write_pngs(tmp_path / "data/train", ["car/0_real", "car/1_fake", "cat/0_real"])
    result = run_main(_train_args("data", tiny_backbone) + ["--train-classes", "cat"], cwd=tmp_path)
    assert_one_line_error(result, "fake")
    result = run_main(_train_args("data", tiny_backbone) + ["--train-classes", "horse"], cwd=tmp_path)
    assert_one_line_error(result, "horse")


def test_missing_data_folder_is_one_line(tmp_path, tiny_backbone):
    result = run_main(_train_args("no_such_folder", tiny_backbone), cwd=tmp_path)
    assert_one_line_error(result, "no_such_folder")
