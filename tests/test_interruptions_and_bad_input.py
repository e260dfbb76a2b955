"""Nothing lost, nothing run that shouldn't: bad files, killed and interrupted runs, unsafe checkpoints, one-line errors.

Everything goes through the command line (`python /abs/rine_plus_ssca.py ...` with cwd in a tmp folder),
with the tiny CLIP-shaped backbone of conftest. Independent runs are started side by side (two or three
processes, one thread each) so the file stays within a few minutes on a 2-core CPU.
"""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rine_plus_ssca as rps
from conftest import nonempty_lines, run_main, run_script, small_config, write_demo_tree
from test_run_ends import WRAPPER

TINY_ARGS = ["--batch-size", "8", "--proj-dim", "32", "--spec-channels", "16", "--fusion-dim", "32",
             "--fusion-heads", "4", "--num-workers", "0", "--device", "cpu", "--amp", "bf16"]
# AMP given, not "auto": the bf16 backbone path on every CPU, not only where the CPU has bf16 instructions
# (the float32 path: tests/test_evaluation.py, tests/test_readme_promises.py).
# 2 x 12 images per class: 48 training images, 6 steps of 8 per epoch, every image seen every epoch.
LAYOUT = {"train": {"nearest": 12, "bilinear": 12}, "val": {"nearest": 4, "bilinear": 4}}
STEPS_PER_EPOCH = 2 * sum(LAYOUT["train"].values()) // 8
RESUMABLE = ["--epochs", "2", "--deterministic", "--save-every-steps", "2", "--log-every", "1", "--seed", "0"]
TQDM_FRAGMENT = re.compile(r"^epoch \d+/\d+:")  # progress-bar refreshes, which tqdm writes to stderr


def train_args(data_dir, backbone, checkpoint_dir, *extra):
    return [*TINY_ARGS, "--clip-model", backbone, "--data-dir", data_dir, "--checkpoint-dir", checkpoint_dir, *extra]


def env_one_thread():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")


def run_side_by_side(jobs, max_workers=2):
    """[(args, cwd), ...] -> CompletedProcess list, at most max_workers processes at a time."""
    with ThreadPoolExecutor(max_workers) as pool:
        return list(pool.map(lambda job: run_script(job[0], cwd=job[1], env_extra={"OMP_NUM_THREADS": "1"}), jobs))


def start_script(args, cwd, name, hold_at=3):
    """Popen of the script with stdout/stderr in files (a pipe nobody reads could fill up and block it).

    It runs under test_run_ends' wrapper: training step `hold_at` writes <name>.step once done and waits
    there until a stop signal arrives, so a test signals the run at a known step instead of polling for
    a moment that a fast machine could pass in between two looks.
    """
    out, err = open(Path(cwd) / f"{name}.out", "w"), open(Path(cwd) / f"{name}.err", "w")
    wrapper = Path(cwd) / "run_ends_wrapper.py"
    wrapper.write_text(WRAPPER)
    env = dict(env_one_thread(), RUN_ENDS_MODE="wait_for_signal", RUN_ENDS_AT=str(hold_at),
               RUN_ENDS_MARKER=str(Path(cwd) / name))
    process = subprocess.Popen([sys.executable, str(wrapper), *map(str, args)], cwd=cwd, env=env, stdout=out, stderr=err)
    process.log_files = (out, err)
    process.marker = Path(cwd) / f"{name}.step"
    return process


def finish(process, timeout=900):
    """Wait for the process (killing it if this is reached by a failure) and return its (stdout, stderr)."""
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out, err = process.log_files
    out.close()
    err.close()
    return Path(out.name).read_text(), Path(err.name).read_text()


def message_lines(stderr):
    """stderr without tqdm's progress-bar refreshes: what a user reads as messages."""
    fragments = (part.strip() for part in re.split(r"[\r\n]", stderr))
    return [part for part in fragments if part and not TQDM_FRAGMENT.match(part)]


def assert_one_line_error(returncode, stdout, stderr, *fragments):
    output = stdout + stderr
    assert returncode not in (0, 2), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = message_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-3000:]
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    return lines[0]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(expected, got, what):
    assert expected.keys() == got.keys(), what
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{what}: tensors differ: {different[:5]}"


def wait_for_held_step(process, path, guard_s=900):
    """Wait until the run holds its training step (its marker file exists); returns the last checkpoint's resume state."""
    deadline = time.monotonic() + guard_s  # a guard against hanging forever, not a timing assertion
    while not process.marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before reaching the held step")
        if time.monotonic() > deadline:
            pytest.fail(f"no {process.marker.name} after {guard_s} s")
        time.sleep(0.05)
    return load(path)["resume"]  # written atomically at step 2 (SAVE_EVERY_STEPS), before the held step 3


# =========================================================================== shared runs

@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_demo_tree(tmp_path_factory.mktemp("robust_tree") / "data", LAYOUT, seed=3)


class ReferenceRuns:
    """Two uninterrupted --deterministic runs (A and B), started in the background as soon as asked for."""

    def __init__(self, root, tree, backbone):
        self.root, self.tree, self.backbone = root, tree, backbone
        self.pool = ThreadPoolExecutor(2)
        self.futures = {name: self.pool.submit(self._run, name) for name in ("a", "b")}

    def args(self, checkpoint_dir, *extra):
        return train_args(self.tree, self.backbone, checkpoint_dir, *RESUMABLE, *extra)

    def _run(self, name):
        result = run_script(self.args(self.root / name), cwd=self.root, env_extra={"OMP_NUM_THREADS": "1"})
        return result, self.root / name

    def get(self, name):
        result, folder = self.futures[name].result()
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result, folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tree, tiny_backbone):
    runs = ReferenceRuns(tmp_path_factory.mktemp("reference"), tree, tiny_backbone)
    yield runs
    runs.pool.shutdown(wait=True)


# =========================================================================== 2. killed and resumed

def test_killed_run_resumes_to_the_same_checkpoint(reference, tmp_path):
    process = start_script(reference.args(tmp_path / "ckpt"), tmp_path, "killed")
    last = tmp_path / "ckpt" / rps.LAST_NAME
    try:
        seen = wait_for_held_step(process, last)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        finish(process)
    assert process.returncode == -signal.SIGKILL
    assert seen["epoch"] <= 2 and seen["step"] > 0

    # SIGKILL gives no chance to clean up; the checkpoint on disk must still be whole (atomic writes).
    state = load(last)
    assert state["resume"]["epoch"] <= 2
    assert (state["resume"]["epoch"], state["resume"]["step"]) >= (seen["epoch"], seen["step"])

    resumed = run_script(reference.args(tmp_path / "ckpt", "--resume"), cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout

    _, reference_dir = reference.get("a")
    for name in (rps.LAST_NAME, rps.BEST_NAME):
        expected, got = load(reference_dir / name), load(tmp_path / "ckpt" / name)
        assert_same_tensors(expected["model"], got["model"], f"resumed {name}")
        assert got["history"] == expected["history"], name
        assert got["epoch"] == expected["epoch"], name
        assert got.get("calibration") == expected.get("calibration"), name  # best: fitted on the same logits
    assert [m["epoch"] for m in load(last)["history"]] == [1, 2]
    # The per-step loss log drops what was written after the checkpoint: it reads as the uninterrupted run's.
    log = (tmp_path / "ckpt" / rps.LOSS_LOG_NAME).read_text()
    assert log == (reference_dir / rps.LOSS_LOG_NAME).read_text() and log.count("\n") > 4, log


def test_two_deterministic_runs_are_identical_and_record_provenance(reference):
    import torchvision
    import transformers

    _, a = reference.get("a")
    _, b = reference.get("b")
    for name in (rps.LAST_NAME, rps.BEST_NAME):
        first, second = load(a / name), load(b / name)
        assert_same_tensors(first["model"], second["model"], name)
        assert first["history"] == second["history"], name
    last = load(a / rps.LAST_NAME)
    assert [m["epoch"] for m in last["history"]] == [1, 2]

    config = rps.checkpoint_config(last)
    assert set(rps.CONFIG_NAMES) <= set(config)
    expected = dict(BATCH_SIZE=8, PROJ_DIM=32, SPEC_CHANNELS=16, FUSION_DIM=32, FUSION_HEADS=4, EPOCHS=2,
                    DETERMINISTIC=True, SAVE_EVERY_STEPS=2, LOG_EVERY=1, SEED=0, DATA_DIR=str(reference.tree),
                    CHECKPOINT_DIR=str(a), CLIP_MODEL=reference.backbone, DEVICE="cpu")
    assert {k: config[k] for k in expected} == expected
    assert last["versions"] == {"torch": torch.__version__, "torchvision": torchvision.__version__,
                                "transformers": transformers.__version__}
    assert last["model_code_sha256"] == rps.model_code_sha256() and len(last["model_code_sha256"]) == 64
    assert last["git_commit"] == rps.git_commit()  # the commit of this checkout (None outside one)


# =========================================================================== 3. Ctrl-C and SIGTERM

@pytest.fixture(scope="module")
def interrupted(reference, tmp_path_factory):
    """One run stopped with SIGINT and one with SIGTERM, both mid-epoch, side by side."""
    root = tmp_path_factory.mktemp("interrupted")
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        folder = root / sig.name
        folder.mkdir()
        runs[sig] = (start_script(reference.args(folder / "ckpt"), folder, "run"), folder)
    results = {}
    try:
        for sig, (process, folder) in runs.items():
            wait_for_held_step(process, folder / "ckpt" / rps.LAST_NAME)
            process.send_signal(sig)
    finally:
        for sig, (process, folder) in runs.items():
            stdout, stderr = finish(process)
            results[sig] = (process.returncode, stdout, stderr, folder)
    return results


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_saves_the_last_checkpoint_and_says_resume(interrupted, sig):
    returncode, stdout, stderr, folder = interrupted[sig]
    # A saved interruption is not a failure: one line, no "error:", exit 128 + the signal's number.
    assert returncode == 128 + sig and "Traceback" not in stdout + stderr, stderr[-3000:]
    lines = message_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("Interrupted by ") and "--resume" in lines[0], stderr[-3000:]
    line = lines[0]
    position = re.search(r"epoch (\d+), step (\d+)", line)
    assert position, line
    last = folder / "ckpt" / rps.LAST_NAME
    assert str(rps.LAST_NAME) in line and last.is_file()
    state = load(last)
    # The checkpoint is the one written on the way out: the position the message names.
    assert (state["resume"]["epoch"], state["resume"]["step"]) == (int(position.group(1)), int(position.group(2)))
    assert state["resume"]["step"] > 0
    assert state["model"] and all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


# --------------------------------------------------------------------------- Ctrl-C at an epoch boundary
# A signal can arrive at any moment, also while an epoch's results are being saved. The moments are hit
# exactly here, in this process, by making the save functions raise KeyboardInterrupt (what Ctrl-C raises).

def restore_determinism():
    """train(DETERMINISTIC=True) switches deterministic algorithms on for the whole process; switch them back."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    return lambda: torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def boundary_config(backbone, tree, checkpoint_dir):
    return small_config(backbone, DATA_DIR=str(tree), CHECKPOINT_DIR=str(checkpoint_dir), EPOCHS=2, DETERMINISTIC=True,
                        SAVE_EVERY_STEPS=1)


@pytest.fixture(scope="module")
def boundary_reference(tmp_path_factory, tiny_backbone):
    """A 2-epoch in-process run on 16 images (2 steps per epoch), uninterrupted."""
    root = tmp_path_factory.mktemp("boundary")
    tree = write_demo_tree(root / "data", {"train": {"nearest": 4, "bilinear": 4}, "val": {"nearest": 2, "bilinear": 2}},
                           seed=4)
    restore = restore_determinism()
    try:
        rps.train(boundary_config(tiny_backbone, tree, root / "reference"))
    finally:
        restore()
    return tree, root / "reference"


@pytest.mark.parametrize("moment", ["while_saving_best", "after_epoch_end_save"])
def test_interrupt_at_an_epoch_boundary_resumes_to_the_same_checkpoint(moment, boundary_reference, tiny_backbone,
                                                                       tmp_path, monkeypatch):
    tree, reference_dir = boundary_reference
    request_restore = restore_determinism()

    fired = []
    real_save_last, real_atomic_save = rps.save_last, rps.atomic_torch_save

    def save_last_then_ctrl_c(path, learner, progress, *args):
        real_save_last(path, learner, progress, *args)
        if moment == "after_epoch_end_save" and not fired and (progress.epoch, progress.step) == (2, 0):  # epoch 1 just ended
            fired.append(moment)
            raise KeyboardInterrupt

    def ctrl_c_while_saving_best(obj, path):
        if moment == "while_saving_best" and not fired and Path(path).name == rps.BEST_NAME:
            fired.append(moment)
            raise KeyboardInterrupt
        real_atomic_save(obj, path)

    monkeypatch.setattr(rps, "save_last", save_last_then_ctrl_c)
    monkeypatch.setattr(rps, "atomic_torch_save", ctrl_c_while_saving_best)
    cfg = boundary_config(tiny_backbone, tree, tmp_path / "run")
    try:
        with pytest.raises(rps.UserError, match="--resume"):
            rps.train(cfg)
        assert fired == [moment]
        monkeypatch.undo()
        cfg.RESUME = True
        rps.train(cfg)
    finally:
        request_restore()
    for name in (rps.LAST_NAME, rps.BEST_NAME):
        expected, got = load(reference_dir / name), load(tmp_path / "run" / name)
        assert [m["epoch"] for m in got["history"]] == [m["epoch"] for m in expected["history"]] == [1, 2], name
        assert got["history"] == expected["history"], name
        assert got["epoch"] == expected["epoch"], name
        assert_same_tensors(expected["model"], got["model"], f"{moment}: {name}")


# =========================================================================== 1. unreadable and odd images

def _save_jpeg_bytes(array):
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    """40 labelled training images (every one is read each epoch at batch size 8), 3 of them unreadable,
    4 odd but readable; one image in no label folder; a clean validation split."""
    root = write_demo_tree(tmp_path_factory.mktemp("bad_tree") / "data",
                           {"train": {"nearest": 8, "bilinear": 8}, "val": {"nearest": 3, "bilinear": 3}}, seed=5)
    rng = np.random.default_rng(7)
    train = root / "train"
    extra = rps.make_demo_image(rng, False)
    Image.fromarray(extra).save(train / "nearest/0_real/extra.png")  # 33 normal images + 7 odd ones = 40

    unreadable = {
        "truncated": train / "nearest/0_real/truncated.jpg",
        "empty": train / "nearest/1_fake/empty.png",
        "text": train / "bilinear/0_real/notes.png",
    }
    full = _save_jpeg_bytes(rps.make_demo_image(rng, False))
    unreadable["truncated"].write_bytes(full[: len(full) // 2])
    unreadable["empty"].write_bytes(b"")
    unreadable["text"].write_text("this is a text file, not a PNG\n")

    readable = {
        "cmyk": train / "nearest/0_real/cmyk.jpg",
        "sixteen_bit": train / "nearest/1_fake/sixteen.png",
        "tiny": train / "bilinear/0_real/tiny.png",
        "palette": train / "bilinear/1_fake/palette.gif",
    }
    Image.fromarray(rps.make_demo_image(rng, False)).convert("CMYK").save(readable["cmyk"], quality=95)
    Image.fromarray((rps.make_demo_image(rng, True)[..., 0].astype(np.uint16) * 257)).save(readable["sixteen_bit"])
    Image.fromarray(rps.make_demo_image(rng, False)[:10, :10]).save(readable["tiny"])
    Image.fromarray(rps.make_demo_image(rng, True)).convert("P", palette=Image.Palette.ADAPTIVE).save(readable["palette"])
    stray = train / "nearest/stray.png"  # under a generator folder but no label folder
    Image.fromarray(rps.make_demo_image(rng, True)).save(stray)

    # The odd images are what the test says they are.
    assert Image.open(readable["cmyk"]).mode == "CMYK"
    assert Image.open(readable["sixteen_bit"]).mode.startswith("I")
    assert Image.open(readable["palette"]).mode == "P"
    assert Image.open(readable["tiny"]).size == (10, 10)
    labelled = [p for p in train.rglob("*") if p.is_file() and p.parent.name in ("0_real", "1_fake")]
    assert len(labelled) == 40
    return dict(root=root, unreadable=unreadable, readable=readable, stray=stray, labelled=labelled)


@pytest.fixture(scope="module")
def bad_runs(bad_tree, tiny_backbone, tmp_path_factory):
    """Training with MAX_BAD_FRACTION 0.5, training with the default, and check-data, side by side."""
    cwd = tmp_path_factory.mktemp("bad_runs")
    root = bad_tree["root"]
    jobs = {
        "tolerant": train_args(root, tiny_backbone, cwd / "tolerant", "--epochs", "2", "--max-bad-fraction", "0.5"),
        "default": train_args(root, tiny_backbone, cwd / "default", "--epochs", "2"),
        "check": ["check-data", "--data", root / "train", "--workers", "2"],
    }
    results = run_side_by_side([(args, cwd) for args in jobs.values()], max_workers=3)
    return dict(zip(jobs, results)), cwd


def test_unreadable_images_are_skipped_and_reported_once(bad_runs, bad_tree):
    results, cwd = bad_runs
    result = results["tolerant"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    for name, path in bad_tree["unreadable"].items():
        assert output.count(f"skipped unreadable image {path}") == 1, (name, output[-3000:])
    reported = re.findall(r"skipped unreadable image (\S+)", output)
    assert sorted(reported) == sorted(str(p) for p in bad_tree["unreadable"].values())  # the odd ones are fine
    for name, path in bad_tree["readable"].items():
        assert str(path) not in " ".join(reported), name
    last = load(cwd / "tolerant" / rps.LAST_NAME)
    assert [m["epoch"] for m in last["history"]] == [1, 2]  # trained to the end
    assert [m["skipped_train"] for m in last["history"]] == [len(bad_tree["unreadable"])] * 2
    assert str(bad_tree["stray"]) in result.stdout  # the unlabeled image is noted, not trained on


def _check_data_sections(stdout):
    """{section title: [paths listed under it]} from check-data's report."""
    sections, current = {}, None
    for line in stdout.splitlines():
        header = re.match(r"^(unreadable images|tiny images|unlabeled images|files without an image extension)"
                          r".*: (\d+)$", line)
        if header:
            current = header.group(1)
            sections[current] = {"count": int(header.group(2)), "paths": []}
        elif current and line.startswith("  "):
            sections[current]["paths"].append(line.strip().split("  (")[0])
        else:
            current = None
    return sections


def _table_rows(stdout, first_column):
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_column]
                 and i + 1 < len(lines) and set(lines[i + 1].replace(" ", "")) == {"-"})
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_check_data_lists_unreadable_tiny_and_unlabeled_files(bad_runs, bad_tree):
    result = bad_runs[0]["check"]
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # 1: unreadable files exist
    assert "Traceback" not in result.stderr
    sections = _check_data_sections(result.stdout)
    unreadable = sorted(str(p) for p in bad_tree["unreadable"].values())
    assert sorted(sections["unreadable images"]["paths"]) == unreadable
    assert sections["unreadable images"]["count"] == len(unreadable)
    assert sections["tiny images"]["paths"] == [str(bad_tree["readable"]["tiny"])]
    assert sections["unlabeled images"]["paths"] == [str(bad_tree["stray"])]

    expected = {}
    for path in bad_tree["labelled"]:
        counts = expected.setdefault(path.parent.parent.name, [0, 0])
        counts[path.parent.name == "1_fake"] += 1
    rows = {row[0]: [int(row[1]), int(row[2])] for row in _table_rows(result.stdout, "folder")}
    assert rows.pop("total") == [sum(c[0] for c in expected.values()), sum(c[1] for c in expected.values())]
    assert rows == expected


def test_too_many_unreadable_images_stop_with_one_line(bad_runs, bad_tree):
    results, cwd = bad_runs
    result = results["default"]
    line = assert_one_line_error(result.returncode, result.stdout, result.stderr, "MAX_BAD_FRACTION", "check-data")
    examples = re.search(r"e\.g\. (.*?)\. Run", line)
    assert examples, line
    named = examples.group(1).split("; ")
    assert named and set(named) <= {str(p) for p in bad_tree["unreadable"].values()}, line
    assert not (cwd / "default" / rps.BEST_NAME).exists()  # stopped in the first epoch


# =========================================================================== 4. checkpoints that would run code

class WritesAFile:
    """Unpickling this opens `path` for writing (creating it)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


class RunsAShellCommand:
    """Unpickling this runs `touch path` through os.system."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


def write_evil(kind, path, target):
    content = {"format": rps.CHECKPOINT_FORMAT, "config": {}}
    if kind == "open_via_torch_save":
        torch.save({**content, "model": {"w": torch.zeros(2)}, "payload": WritesAFile(target)}, path)
    else:  # plain pickle, no torch archive around it
        with open(path, "wb") as f:
            pickle.dump({**content, "model": {}, "payload": RunsAShellCommand(target)}, f)


def load_unsafely(kind, path):
    if kind == "open_via_torch_save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)


@pytest.mark.parametrize("kind", ["open_via_torch_save", "os_system_via_pickle"])
def test_checkpoint_that_would_run_code_is_refused(kind, tmp_path, bad_tree):
    # Control: the same payload aimed elsewhere really does write its file when unpickled without care.
    control_target = tmp_path / "control_written"
    write_evil(kind, tmp_path / "control.pth", control_target)
    load_unsafely(kind, tmp_path / "control.pth")
    assert control_target.exists()

    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    write_evil(kind, evil, target)
    image = bad_tree["readable"]["cmyk"]
    commands = [["eval", "--ckpt", evil, "--data", bad_tree["root"] / "val", "--device", "cpu", "--num-workers", "0"],
                ["predict", "--ckpt", evil, image, "--device", "cpu", "--num-workers", "0"]]
    for command in commands:  # main() in this process: the refusal's message is the point
        result = run_main(command, tmp_path)
        assert_one_line_error(result.returncode, result.stdout, result.stderr, "refused", str(evil))
        assert not target.exists(), command[0]
    with pytest.raises(rps.UserError, match="(?i)refused"):
        rps.load_detector(evil, device="cpu")
    assert not target.exists()


# =========================================================================== 5. one-line failures

@pytest.fixture(scope="module")
def failures(reference, tree, tiny_backbone, tmp_path_factory):
    """Every mistake of the list, through the command line: name -> (result, cwd)."""
    root = tmp_path_factory.mktemp("failures")
    _, reference_dir = reference.get("a")
    checkpoint = load(reference_dir / rps.BEST_NAME)

    (root / "empty/train").mkdir(parents=True)
    write_demo_tree(root / "one_class", {"train": {"nearest": 3}, "val": {"nearest": 2}})
    shutil.rmtree(root / "one_class/train/nearest/1_fake")  # training reals only; validation has both

    shape = {**checkpoint, "model": dict(checkpoint["model"])}
    name = next(k for k, v in shape["model"].items() if v.dim() == 2)
    shape["model"][name] = torch.zeros(shape["model"][name].shape[0], shape["model"][name].shape[1] + 3)
    torch.save(shape, root / "other_shape.pth")
    torch.save({**checkpoint, "model": {**checkpoint["model"], "extra_head.weight": torch.zeros(3, 3)}},
               root / "extra_key.pth")
    torch.save({**checkpoint, "format": 999}, root / "format_999.pth")

    val = tree / "val"
    cases = {
        "missing_data": train_args(root / "nowhere", tiny_backbone, root / "ck_missing"),
        "missing_data_debug": train_args(root / "nowhere", tiny_backbone, root / "ck_missing", "--debug"),
        "empty_data": train_args(root / "empty", tiny_backbone, root / "ck_empty"),
        "one_class": train_args(root / "one_class", tiny_backbone, root / "ck_one"),
        "unknown_option": ["--bach-size", "3"],
        "other_shape": ["eval", "--ckpt", root / "other_shape.pth", "--data", val, "--device", "cpu", "--num-workers", "0"],
        "extra_key": ["eval", "--ckpt", root / "extra_key.pth", "--data", val, "--device", "cpu", "--num-workers", "0"],
        "format_999": ["eval", "--ckpt", root / "format_999.pth", "--data", val, "--device", "cpu", "--num-workers", "0"],
        "no_backbone": train_args(tree, "/nonexistent/folder", root / "ck_backbone"),
        "no_backbone_hub_id": train_args(tree, "no-such-org/no-such-clip-model", root / "ck_backbone_id"),  # offline
        "nonfinite": train_args(tree, tiny_backbone, root / "ck_nan", "--epochs", "1", "--lr", "1e30", "--amp", "off",
                                "--log-every", "1", "--save-every-steps", "1"),
        "export": ["export", "--ckpt", reference_dir / rps.BEST_NAME, "--out", root / "out/detector.safetensors"],
    }
    # Real processes where the process is the point: --debug's traceback is the interpreter's, and the hub id is
    # looked up offline as a fresh interpreter does. The other mistakes are messages of main(), checked in this
    # process (no interpreter to start, no torch to import).
    in_processes = ("missing_data_debug", "no_backbone_hub_id")
    with ThreadPoolExecutor(len(in_processes)) as pool:
        started = {name: pool.submit(run_script, cases[name], root, 900, {"OMP_NUM_THREADS": "1"}) for name in in_processes}
        results = {name: run_main(args, root) for name, args in cases.items() if name not in in_processes}
        results.update((name, future.result()) for name, future in started.items())
    return {name: results[name] for name in cases}, root, reference_dir


@pytest.mark.parametrize("case,fragments", [
    ("missing_data", ["nowhere"]),
    ("empty_data", ["no labelled images"]),
    ("one_class", ["fake"]),
    ("other_shape", ["other_shape.pth"]),
    ("extra_key", ["extra_key.pth", "extra_head.weight"]),
    ("format_999", ["format_999.pth", "999"]),
    ("no_backbone", ["/nonexistent/folder", "HF_ENDPOINT"]),
    ("no_backbone_hub_id", ["no-such-org/no-such-clip-model", "HF_ENDPOINT"]),
])
def test_failure_is_one_line_without_traceback(failures, case, fragments):
    result = failures[0][case]
    assert_one_line_error(result.returncode, result.stdout, result.stderr, *fragments)


def test_unknown_option_is_one_line_with_a_suggestion(failures):
    result = failures[0]["unknown_option"]
    assert result.returncode == 2
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1 and "--bach-size" in lines[0] and "--batch-size" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_debug_shows_the_traceback(failures):
    quiet, loud = failures[0]["missing_data"], failures[0]["missing_data_debug"]
    assert "Traceback" not in quiet.stderr
    assert loud.returncode != 0
    assert "Traceback" in loud.stderr and "UserError" in loud.stderr
    assert message_lines(quiet.stderr)[0][len("error: "):] in loud.stderr  # the same message, with its origin


def test_nonfinite_loss_names_the_step(failures):
    result = failures[0]["nonfinite"]
    line = assert_one_line_error(result.returncode, result.stdout, result.stderr, "non-finite")
    position = re.search(r"epoch (\d+), step (\d+)", line)
    assert position, line
    epoch, step = int(position.group(1)), int(position.group(2))
    assert epoch == 1 and 1 <= step <= STEPS_PER_EPOCH
    # --save-every-steps 1: the last checkpoint is the step before the one named, and it is finite.
    last = failures[1] / "ck_nan" / rps.LAST_NAME
    if step > 1:
        state = load(last)
        assert (state["resume"]["epoch"], state["resume"]["step"]) == (1, step - 1)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    else:
        assert not last.exists()


def test_export_to_safetensors_keeps_tensors_and_config(failures):
    from safetensors import safe_open
    from safetensors.torch import load_file

    result, root, reference_dir = failures[0]["export"], failures[1], failures[2]
    assert result.returncode == 0, result.stdout + result.stderr
    out = root / "out/detector.safetensors"
    checkpoint = load(reference_dir / rps.BEST_NAME)
    assert_same_tensors(checkpoint["model"], load_file(out), "safetensors export")
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["config"]) == rps.checkpoint_config(checkpoint)
