"""Shared fixtures: a tiny CLIP-architecture backbone, small configs, generated image trees.

Everything runs on the CPU, offline, inside pytest's tmp folders: nothing is written to the
repository's data/ or checkpoints/, and no model weights are downloaded.
"""

import contextlib
import hashlib
import inspect
import io
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

# One intra-op thread, here and in every subprocess: on a small shared CPU, OpenMP threads
# competing with DataLoader workers or other processes make conv backward 100x slower.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "rine_plus_ssca.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Any accidental attempt to reach the HuggingFace Hub fails fast instead of hanging/downloading.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import rine_plus_ssca as rps  # noqa: E402

# Tiny ViT with CLIP's architecture: 4 blocks, width 64, 7x7 patch grid at 224x224.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            image_size=224, patch_size=32, projection_dim=64)


def save_tiny_backbone(folder, seed=0, **overrides):
    """Random CLIPVisionModel saved with save_pretrained, loaded later through from_pretrained."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**{**TINY, **overrides})).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny_clip", seed=0)


def small_config(backbone, **overrides):
    """default_config() with small widths, CPU, no worker processes; overrides win."""
    cfg = rps.default_config()
    cfg.CLIP_MODEL = backbone
    cfg.PROJ_DIM, cfg.SPEC_CHANNELS, cfg.FUSION_DIM, cfg.FUSION_HEADS = 32, 16, 32, 4
    cfg.NUM_WORKERS, cfg.BATCH_SIZE, cfg.DEVICE, cfg.AMP = 0, 8, "cpu", "off"
    cfg.PATCH_BLOCK = 2  # the tiny backbone has 4 blocks
    cfg.LOG_EVERY = 1
    for name, value in overrides.items():
        assert name in rps.CONFIG_NAMES, name  # a typo here must not silently do nothing
        setattr(cfg, name, value)
    return cfg


@pytest.fixture
def make_cfg(tiny_backbone):
    return lambda **overrides: small_config(tiny_backbone, **overrides)


def clip_pixels(batch, seed=0, size=224):
    """A batch shaped like CLIP-normalised images."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def write_demo_tree(root, layout, seed=0, label_folders=("0_real", "1_fake"), size=256):
    """root/<split>/<generator>/<real|fake folder>/*.png from make_demo_image; layout: split -> {gen: n per class}."""
    rng = np.random.default_rng(seed)
    for split, generators in layout.items():
        for generator, count in generators.items():
            for label_folder, fake in zip(label_folders, (False, True)):
                folder = Path(root) / split / generator / label_folder
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    method = generator if generator in ("nearest", "bilinear", "transposed_conv") else "bilinear"
                    Image.fromarray(rps.make_demo_image(rng, fake, method, size)).save(folder / f"{i:04d}.png")
    return Path(root)


# One epoch of a small head on the CPU in float32, so in-process scores match the command's to float rounding.
TINY_TRAIN_OPTIONS = ["--epochs", "1", "--batch-size", "16", "--proj-dim", "32", "--spec-channels", "16",
                      "--fusion-dim", "32", "--fusion-heads", "4", "--num-workers", "0", "--device", "cpu", "--amp", "off"]


def train_tiny_checkpoint(root, backbone, seed):
    """A checkpoint trained through the command line in root, on a small demo tree (~15 s):
    (path of the best checkpoint, the completed process)."""
    write_demo_tree(Path(root) / "data", {"train": {"nearest": 16, "bilinear": 16}, "val": {"nearest": 4, "bilinear": 4}},
                    seed=seed)
    result = run_script(["--data-dir", "data", "--checkpoint-dir", "ckpt", "--clip-model", backbone, *TINY_TRAIN_OPTIONS],
                        cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return Path(root) / "ckpt" / rps.BEST_NAME, result


def run_script(args, cwd, timeout=900, env_extra=None):
    """`python /abs/rine_plus_ssca.py ARGS` in cwd (a tmp folder), captured."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_main(args, cwd):
    """rps.main(ARGS) in this process with cwd as the working folder, captured as run_script's result is.

    For tests whose point is a message of the command line, not the process: it saves starting an interpreter
    that imports torch (a few seconds). argparse's exit (SystemExit) becomes the exit code; any other exception
    propagates, so a would-be traceback fails the test. Python's warnings and transformers' log lines land in
    the captured stderr, filtered as in a fresh interpreter, so a stray line still breaks a one-line message."""
    out, err = io.StringIO(), io.StringIO()
    with _transformers_log_to(err), contextlib.chdir(cwd), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in FRESH_INTERPRETER_WARNING_FILTERS:
            warnings.filterwarnings(action, category=category, module=module)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        try:
            code = rps.main([str(arg) for arg in args])
        except SystemExit as end:
            code = end.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


# Python's default warning filters (python -W absent, no -X dev), last added first as filterwarnings inserts.
FRESH_INTERPRETER_WARNING_FILTERS = [
    ("ignore", ResourceWarning, ""), ("ignore", ImportWarning, ""), ("ignore", PendingDeprecationWarning, ""),
    ("ignore", DeprecationWarning, ""), ("default", DeprecationWarning, "__main__"),
]


@contextlib.contextmanager
def _transformers_log_to(stream):
    """transformers' handler keeps the stderr of the moment it was made: point it at stream for a while.
    (Imported here, before any redirection, so that the handler is never made on a StringIO.)"""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()  # makes the default handler if it does not exist yet
    handler = hf_logging._default_handler
    previous = handler.setStream(stream)
    try:
        yield
    finally:
        handler.setStream(previous)


def nonempty_lines(text):
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """One `python rine_plus_ssca.py --demo` run in a tmp folder, shared by every test that needs the demo's
    checkpoint (~1 min): (folder, completed process). The checkpoint is folder/checkpoints/demo/BEST_NAME.

    The script runs as a copy of the one file alone in that folder, with nothing of the project beside it:
    the demo (training, evaluation) needs nothing else."""
    cwd = tmp_path_factory.mktemp("demo")
    shutil.copy(SCRIPT, cwd / SCRIPT.name)
    result = run_copied_script(["--demo"], cwd=cwd)
    return cwd, result


# The commands besides training, in the order their --help is captured below.
HELP_COMMANDS = ("eval", "predict", "check-data", "export", "import-rine", "compare")
HELP_SEPARATOR = "\n=== end of --help ===\n"
# One process asks main() for each command's --help in turn, as `python rine_plus_ssca.py CMD --help` would.
_EVERY_COMMAND_HELP = (
    "import sys\n"
    "sys.argv[0] = 'rine_plus_ssca.py'\n"
    "import rine_plus_ssca\n"
    "for command in sys.argv[1:]:\n"
    "    try:\n"
    "        rine_plus_ssca.main([command, '--help'])\n"
    "    except SystemExit as end:\n"
    "        assert end.code in (0, None), (command, end.code)\n"
    "    else:\n"
    "        raise AssertionError(command + ' --help did not exit')\n"
    "    print(%r, end='', flush=True)\n" % HELP_SEPARATOR
)


@pytest.fixture(scope="session")
def help_texts(tmp_path_factory):
    """{'train' or command: its --help as printed, COLUMNS huge so nothing wraps}, for test_cli and test_guide.

    Training's is `python rine_plus_ssca.py --help` itself; the commands' come from one process that calls
    main([command, '--help']) for each (one interpreter instead of one per command)."""
    cwd = tmp_path_factory.mktemp("help")
    wide = dict(os.environ, COLUMNS="10000", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
    texts = {}
    result = run_script(["--help"], cwd=cwd, env_extra={"COLUMNS": "10000"})
    assert result.returncode == 0, result.stderr
    texts["train"] = result.stdout
    result = subprocess.run([sys.executable, "-c", _EVERY_COMMAND_HELP, *HELP_COMMANDS], cwd=cwd, env=wide,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    printed = result.stdout.split(HELP_SEPARATOR)
    assert len(printed) == len(HELP_COMMANDS) + 1 and printed[-1] == "", result.stdout[-3000:]
    for command, text in zip(HELP_COMMANDS, printed):
        assert text.startswith("usage: rine_plus_ssca.py " + command), (command, text[:200])
        texts[command] = text
    return texts


# The layout and length of the run behind `trained_checkpoint`: three generators in test/ (one the training never
# saw) and two epochs, so the last checkpoint's history has an epoch the best one can be chosen against.
TRAINED_LAYOUT = {"train": {"nearest": 12, "bilinear": 12}, "val": {"nearest": 6, "bilinear": 6},
                  "test": {"nearest": 4, "bilinear": 4, "transposed_conv": 4}}
TRAINED_EPOCHS = 2


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, tiny_backbone):
    """One small detector trained in this process for the whole test run (~6 s), for every test that only needs
    "a trained checkpoint": dict(root, cfg: its configuration, best and last: the checkpoints' paths,
    test_images: root/data/test's images, stdout: what training printed).

    Shared by many modules, so read-only: a test that changes a file, or trains on, copies it first. The end of
    the test run checks that nothing in its folder was written, added or removed."""
    root = tmp_path_factory.mktemp("trained_checkpoint")
    write_demo_tree(root / "data", TRAINED_LAYOUT, seed=1)
    cfg = small_config(tiny_backbone, DATA_DIR=str(root / "data"), CHECKPOINT_DIR=str(root / "checkpoints"),
                       EPOCHS=TRAINED_EPOCHS)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        best = Path(rps.train(cfg))
    written = folder_contents(root)
    yield dict(root=root, cfg=cfg, best=best, last=best.with_name(rps.LAST_NAME), stdout=printed.getvalue(),
               test_images=sorted(str(p) for p in (root / "data/test").rglob("*.png")))
    assert folder_contents(root) == written, "a test changed the shared trained_checkpoint's folder; copy it first"


def folder_contents(root):
    """{relative path: sha256} of every file under root."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(Path(root).rglob("*")) if path.is_file()}


def run_copied_script(args, cwd, timeout=900, env_extra=None):
    """`python rine_plus_ssca.py ARGS` with the copy of the script in cwd (not the repository's), captured."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH="", **(env_extra or {}))
    return subprocess.run([sys.executable, "-I", SCRIPT.name, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- test lanes
# `pytest -m "not slow" tests` is the fast lane (unit tests, a minute or two on 2 cores); the README's
# command and CI run everything. A test is slow when it trains a model or runs the script or a benchmark
# as a process: through one of these fixtures (each does so once per module or session), by calling one of
# these in its own body, or when it is marked @pytest.mark.slow itself.
SLOW_FIXTURES = {
    "demo", "trained_checkpoint", "run", "trained", "reference", "interrupted", "boundary_reference", "bad_runs",
    "failures", "group_signalled", "cache_runs", "torchrun_run", "executed", "help_entries", "help_options",
    "help_texts",
}
SLOW_CALLS = re.compile(r"\b(run_script|run_copied_script|run_benchmark|torchrun|train_tiny_checkpoint|rps\.train|"
                        r"subprocess\.|get_context|Run)\(")


def pytest_collection_modifyitems(config, items):
    for item in items:
        body = inspect.getsource(item.function) if hasattr(item, "function") else ""
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or SLOW_CALLS.search(body):
            item.add_marker(pytest.mark.slow)
