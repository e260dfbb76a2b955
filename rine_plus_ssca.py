"""RINE+SSCA: tell real photographs from AI-generated images.

One file, read top to bottom: configuration, setup, losses, modules, model, data,
evaluation, checkpoints, training, command line. The tools that are not the detector
(benchmark protocols, check-data, RINE's format, heatmaps, pictures, statistics, --seeds,
torchrun) are in the package rine_plus_ssca_tools/ beside it; this file alone trains,
evaluates and predicts.

    python rine_plus_ssca.py --demo                  # offline: tiny backbone, generated data, ~2.5 min on a 2-core CPU
    python rine_plus_ssca.py                         # train with the constants below (data/train, data/val)
    python rine_plus_ssca.py --batch-size 64 --xi 0.4  # any constant can be overridden; --help lists them
    python rine_plus_ssca.py eval --ckpt checkpoints/best_rine_plus_ssca.pth --data data/test
    python rine_plus_ssca.py predict --ckpt checkpoints/best_rine_plus_ssca.pth photos/ --explain heatmaps/
    python rine_plus_ssca.py import-rine --ckpt model_4class_trainable.pth --out checkpoints/rine_4class.pth

Training writes checkpoints/best_rine_plus_ssca.pth (best epoch by SELECT_METRIC) and
checkpoints/last_rine_plus_ssca.pth (every epoch). In a notebook:

    from rine_plus_ssca import load_detector, predict
    from rine_plus_ssca_tools.heatmaps import explain
    model = load_detector("checkpoints/best_rine_plus_ssca.pth")
    p_fake = predict(model, ["photo.jpg"])          # NumPy array, P(fake) per image (calibrated in training)
    maps = explain(model, ["photo.jpg"])            # where each image looks generated; draw_explanation(maps[0])

The model: a frozen CLIP ViT-L/14 gives the CLS token of every block; a shared
projection Q1, a trainable importance estimator (TIE) over blocks and a second
projection Q2 turn them into one vector (RINE, Koutlis & Papadopoulos, ECCV 2024).
A spectral branch reads the image's 8x8 block DCT with a DCTConvBlock and a
Spectrum-Spatial Collaborative Attention (SSCA). Cross-attention fuses the two
branches, a gated MLP makes the representation, and the loss is BCE + XI * SupCon.
"""

import argparse
import contextlib
import csv
import difflib
import functools
import hashlib
import importlib
import io
import math
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter

class Constant(NamedTuple):
    """How one constant below is declared: its default, what it affects, its --help text and its allowed values."""
    default: object
    affects: tuple  # of ARCHITECTURE, INPUTS, RUN, SCORING
    help: str
    choices: tuple = None
    at_least: float = None  # allowed values: choices, or at_least/above <= value <= at_most/below
    above: float = None
    at_most: float = None
    below: float = None
    multiple_of: int = None


# What a constant affects; everything that lists constants is derived from these marks.
ARCHITECTURE = "architecture"  # the model: stored with a checkpoint, rebuilt from it, fixed when resuming
INPUTS = "inputs"  # the pixels and tokens the trainable part sees: part of the feature cache's key
RUN = "run"  # this run only (files, machine, optimisation, selection)
SCORING = "scoring"  # how a trained detector scores and decides: kept with it, used by load_detector, predict and eval
_DECLARED = []


def declare(default, affects, help, **allowed):
    """Record one constant's declaration and return its default (so `NAME = declare(...)` is the value)."""
    affects = affects if isinstance(affects, tuple) else (affects,)
    _DECLARED.append(Constant(default, affects, help, **allowed))
    return default


_NAMES_BEFORE_CONFIG = set(globals())
# =====================================================================================
# Configuration: every constant below is also a command-line option (BATCH_SIZE ->
# --batch-size). Edit the first value of a declare(...) to change a default; the text
# is its --help, and what it affects decides the checkpoint and the feature cache.
# =====================================================================================

# --- data and files ---
DATA_DIR = declare("data", RUN, "folder holding train/ and optionally val/ (labels come from folder names)")
CHECKPOINT_DIR = declare("checkpoints", RUN, "where best_/last_rine_plus_ssca.pth are written")
TRAIN_CLASSES = declare("", RUN, 'comma-separated generator/category folders to train on, e.g. "car,cat,chair,horse"; "" = all')
VAL_FRACTION = declare(0.1, RUN, "share of train held out (seeded, stratified) when there is no validation folder; "
                       "0.05-0.2", above=0, below=1)
VAL_DIR = declare("", RUN, 'folder of validation images (labels from folder names, as in train/); "" = DATA_DIR/val '
                  "if it exists")
VAL_CLASSES = declare("", RUN, 'comma-separated generator/category folders kept out of training and used alone as the '
                      'validation set (from the validation folder if it has them, else from train/), e.g. "nearest": '
                      "the best epoch, the temperature and the threshold then come from generators never trained on")

# --- backbone ---
CLIP_MODEL = declare("openai/clip-vit-large-patch14", ARCHITECTURE,
                     "HuggingFace id or a local folder saved with save_pretrained")
BLOCKS = declare("all", ARCHITECTURE, 'CLIP blocks whose CLS token is used: "all", "0-11" or "4,8,12" (0-based)')

# --- model ---
PROJ_DIM = declare(1024, ARCHITECTURE, "d', width of Q1/TIE/Q2 (RINE: 128-1024, best 1024)", at_least=1)
NPROJ = declare(2, ARCHITECTURE, "Linear+ReLU+Dropout layers in each of Q1 and Q2 (RINE: 1-4, best 2)", at_least=1)
DROPOUT = declare(0.5, RUN, "dropout in Q1/Q2 and the gated MLP; 0-0.5", at_least=0, below=1)
SPEC_CHANNELS = declare(256, ARCHITECTURE, "C, channels of the spectral map after the DCTConvBlock; 64-512", at_least=1)
FUSION_DIM = declare(512, ARCHITECTURE, "D, width of the fused representation; 128-1024", at_least=1)
FUSION_HEADS = declare(8, ARCHITECTURE, "attention heads in the cross-attention fusion (must divide FUSION_DIM)", at_least=1)

# --- ablations (one switch each) ---
USE_SPECTRAL = declare(True, ARCHITECTURE, "False = RINE as published (no DCT/SSCA branch, RINE's head and checkpoint "
                       "keys; import-rine loads its weights)")
USE_TIE = declare(True, ARCHITECTURE, "False = plain mean over blocks instead of the learned block importances")
FUSION = declare("cross_attention", ARCHITECTURE, '"cross_attention" or "concat" (concatenate z_clip and z_dct, then Linear)',
                 choices=("cross_attention", "concat"))
SPECTRAL_INPUT = declare("dct", ARCHITECTURE, '"dct" (8x8 block DCT of the pixels) or "clip_patches" (patch tokens of '
                         "PATCH_BLOCK)", choices=("dct", "clip_patches"))
PATCH_BLOCK = declare(12, ARCHITECTURE, 'block whose patch tokens feed the spectral branch when SPECTRAL_INPUT="clip_patches"')

# --- loss and optimisation ---
XI = declare(0.2, RUN, "weight of SupCon; BCE is summed over the batch as in RINE, so at RINE's batch size 128 its grid "
             "{0.1,0.2,0.4,0.8} means the same; 0 = no SupCon", at_least=0)
SUPCON_TEMPERATURE = declare(0.07, RUN, "SupCon temperature (Khosla et al.); 0.05-0.2", above=0)
LR = declare(1e-3, RUN, "Adam learning rate (RINE: 1e-3)", above=0, below=3e38)  # 3e38: the largest float32
LR_DROP_EPOCHS = declare("", RUN, 'epochs (1-based) at whose start LR is divided by 10, as RINE\'s epochs_reduce_lr: '
                         '"6,11" = LR/10 in epochs 6-10, LR/100 from 11 (RINE\'s scripts); "" = constant LR')
WEIGHT_DECAY = declare(0.0, RUN, "Adam weight decay", at_least=0)
EPOCHS = declare(1, RUN, "passes over the training set (RINE found 1 best; try 3-5 when the spectral branch is on)",
                 at_least=1)
BATCH_SIZE = declare(128, RUN, "images per step (RINE: 128; lower it if you run out of GPU memory)", at_least=1)
SELECT_METRIC = declare("ap", RUN, 'validation metric that picks the best epoch: "acc", "ap", "auc" or "loss"',
                        choices=("acc", "ap", "auc", "loss"))
THRESHOLD = declare(0.5, (RUN, SCORING), "P(fake) at or above which an image is called fake", at_least=0, at_most=1)
TARGET_FPR = declare(0.0, RUN, "false-positive rate on validation reals for the stored threshold predict uses; 0 = off "
                     "(0.01-0.1)", at_least=0, below=1)
CALIBRATION_FRACTION = declare(0.0, RUN, "share of the validation images kept apart from choosing the best epoch "
                               "(seeded, stratified): the temperature and the TARGET_FPR threshold are fitted on them "
                               "alone; 0 = the same validation images do both", at_least=0, below=1)

# --- crops and augmentation (what the images look like when they reach the model) ---
CROP_SIZE = declare(224, (ARCHITECTURE, INPUTS), "crop side in pixels; images are cropped, never resized (resizing "
                    "erases artefacts)", at_least=8, multiple_of=8)  # the DCT works on 8x8 blocks
TRAIN_RECIPE = declare("grid", INPUTS, '"grid": crops on the 8-pixel grid, JPEG quality ~ U{JPEG_QUALITY_MIN..100} '
                       '(the spectral branch\'s DCT needs the grid); "rine": RINE\'s data_augment, crops anywhere, JPEG '
                       'quality JPEG_QUALITY_MIN or 100', choices=("grid", "rine"))
TEST_CROP = declare("grid", (INPUTS, SCORING), '"grid": test crops on the 8-pixel grid with mirror padding, as in '
                    'training; "rine": '
                    "RINE's own scoring (import-rine sets it): torchvision's CenterCrop/TenCrop with zero padding, "
                    "float32 sigmoid, fake when P(fake) > threshold, fp16 backbone on GPUs", choices=("grid", "rine"))
BLUR_PROB = declare(0.5, INPUTS, "probability of Gaussian blur", at_least=0, at_most=1)
BLUR_SIGMA_MAX = declare(3.0, INPUTS, "blur sigma ~ U[0, BLUR_SIGMA_MAX]", at_least=0)
JPEG_PROB = declare(0.5, INPUTS, "probability of JPEG re-encoding", at_least=0, at_most=1)
JPEG_QUALITY_MIN = declare(30, INPUTS, 'lowest JPEG quality: any of JPEG_QUALITY_MIN..100 ("grid"), or JPEG_QUALITY_MIN '
                           'or 100 ("rine")', at_least=1, at_most=100)

# --- machine ---
DEVICE = declare("auto", RUN, '"auto" (cuda if available), "cuda", "cuda:1" or "cpu"')
AMP = declare("auto", (RUN, SCORING), 'mixed precision: "auto" (GPU: bf16 if native, Ampere+, else fp16; CPU: bf16 '
              'backbone where the CPU has bf16 instructions), "bf16", "fp16", "off"', choices=("auto", "bf16", "fp16", "off"))
NUM_WORKERS = declare(8, RUN, "data-loading processes (capped at the number of CPU cores)", at_least=0)
SEED = declare(0, RUN, "seeds Python, NumPy and torch: the head's initial weights, the batch order, dropout")
DATA_SEED = declare(0, INPUTS, "seeds the validation hold-out and every augmented view, apart from SEED: runs with "
                    "other SEEDs see the same images and share the feature cache", at_least=0)
LOG_EVERY = declare(20, RUN, "steps between progress-bar loss updates (each update syncs with the GPU)", at_least=1)

# --- speed ---
CACHE_FEATURES = declare(False, RUN, "keep the frozen backbone's tokens on disk: later epochs and runs skip the backbone")
CACHE_VIEWS = declare(4, RUN, "augmented views cached per training image; epoch e uses view (e-1) mod CACHE_VIEWS, so "
                      "set it to EPOCHS for the views an uncached run sees", at_least=1)
CACHE_DIR = declare("", RUN, 'where the cache lives; "" = CHECKPOINT_DIR/cache')
COMPILE = declare(False, RUN, "torch.compile the trainable head (faster on recent GPUs after a slow first step)")

# --- safety and reproducibility ---
RESUME = declare(False, RUN, "continue from CHECKPOINT_DIR/last_rine_plus_ssca.pth (model, optimizer, RNG, position in "
                 "the epoch)")
SAVE_EVERY_STEPS = declare(500, RUN, "also write the last checkpoint every N steps inside an epoch; 0 = only at epoch "
                           "ends", at_least=0)
MAX_BAD_FRACTION = declare(0.05, (RUN, SCORING), "stop when more than this share of a split cannot be read (run "
                           "check-data to list them)", at_least=0, at_most=1)
DETERMINISTIC = declare(False, RUN, "deterministic kernels: two CPU runs give bit-identical checkpoints (slower on GPU)")


def _name_declarations(names):
    """{NAME: Constant}: the UPPERCASE names assigned above, in order, paired with their declare(...) calls."""
    if len(names) != len(_DECLARED) or any(globals()[n] != c.default or type(globals()[n]) is not type(c.default)
                                           for n, c in zip(names, _DECLARED)):
        lost = next((n for n, c in zip(names, _DECLARED) if globals()[n] != c.default), names[-1])
        raise SystemExit(f"rine_plus_ssca.py: the constant {lost} (or the one before it) is not written as "
                         f"{lost} = declare(value, ...): change the first value inside declare(...) instead.")
    return dict(zip(names, _DECLARED))


CONSTANTS = _name_declarations([name for name in dict(globals()) if name.isupper() and not name.startswith("_")
                                and name not in _NAMES_BEFORE_CONFIG])
CONFIG_NAMES = list(CONSTANTS)
CHOICES = {name: c.choices for name, c in CONSTANTS.items() if c.choices}
ARCHITECTURE_CONSTANTS = [name for name, c in CONSTANTS.items() if ARCHITECTURE in c.affects]
INPUT_CONSTANTS = [name for name, c in CONSTANTS.items() if INPUTS in c.affects]
SCORING_CONSTANTS = [name for name, c in CONSTANTS.items() if SCORING in c.affects]

# The demo changes these (options given on the command line still win).
DEMO_OVERRIDES = dict(
    DATA_DIR="data/demo", CHECKPOINT_DIR="checkpoints/demo", CLIP_MODEL="checkpoints/demo/tiny_clip_backbone",
    EPOCHS=4, BATCH_SIZE=32, PROJ_DIM=128, SPEC_CHANNELS=64, FUSION_DIM=128, FUSION_HEADS=4,
    NUM_WORKERS=2, LOG_EVERY=5, PATCH_BLOCK=2,
)

CHECKPOINT_FORMAT = 4  # bumped when the checkpoint layout or the model's function changes (3: RINE's names and head without the spectral branch; BlockDCT on 0-255 pixels; backbone_folder)
# 4: the architecture apart from the run settings; provenance from the model's code, not the file's bytes
READABLE_FORMATS = (3, 4)  # format 3 held every constant in one "config"; read_checkpoint splits it as format 4 does
BEST_NAME = "best_rine_plus_ssca.pth"
LAST_NAME = "last_rine_plus_ssca.pth"
LOSS_LOG_NAME = "train_log.csv"

# CLIP's preprocessing constants, so nothing has to be downloaded to normalise an image.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# =====================================================================================
# Setup: errors, seeds, devices, atomic files
# =====================================================================================

class UserError(Exception):
    """A mistake the user can fix; printed as one line without a traceback."""


class RunInterrupted(UserError):
    """Training stopped by Ctrl-C or SIGTERM after saving where to resume: not a failure, so printed
    without "error:"; the exit code is 128 + the signal's number, as shells report it (130 or 143)."""

    def __init__(self, message, signal_number=signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signal_number)


TOOLS_PACKAGE = "rine_plus_ssca_tools"  # beside this file: what is not the detector (its __init__ lists the modules)


def tools_module(name, needed_by):
    """The module rine_plus_ssca_tools.<name>, imported when a command needs it (never at import time, so this
    file alone still trains, evaluates and predicts); a UserError saying what is missing when it is absent."""
    try:
        return importlib.import_module(f"{TOOLS_PACKAGE}.{name}")
    except ModuleNotFoundError as error:
        if error.name not in (TOOLS_PACKAGE, f"{TOOLS_PACKAGE}.{name}"):  # a library it needs: Python names it
            raise
        raise UserError(f"{needed_by} needs the folder {TOOLS_PACKAGE}/ beside rine_plus_ssca.py (it comes with the "
                        "project; clone the whole repository or `pip install -e .`).") from error


def optional_tools_module(name, needed_by, done_without):
    """tools_module(name), or None after a note saying what is done without it (pictures, warnings)."""
    try:
        return tools_module(name, needed_by)
    except UserError as missing:
        print(f"note: {missing} {done_without}")
        return None


def default_config():
    """The constants at the top of this file as a namespace (cfg.BATCH_SIZE, ...)."""
    return SimpleNamespace(**{name: globals()[name] for name in CONFIG_NAMES})


def seed_everything(seed):
    """Seed Python, NumPy and torch (data workers get per-sample seeds from SeededEpochSampler)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name):
    """'auto' | 'cpu' | 'cuda' | 'cuda:1' -> torch.device, refusing CUDA when there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"DEVICE={name!r} but no CUDA GPU is visible; use --device cpu or install a CUDA build of PyTorch.")
    return device


@functools.lru_cache(maxsize=None)  # read /proc/cpuinfo once, not at every predict() call
def cpu_has_fast_bf16():
    """True on CPUs with bfloat16 matrix instructions (AVX-512 BF16 or AMX), where bf16 is several times faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def scores_as_rine(config):
    """True when a model (its config: a dict or a namespace) scores as RINE's code does, TEST_CROP="rine":
    RINE's crops, a float32 sigmoid, fake when P(fake) > threshold, an fp16 backbone on GPUs."""
    config = config if isinstance(config, dict) else vars(config)
    return config.get("TEST_CROP") == "rine"


def resolve_amp_dtype(amp, device, rine_scoring=False):
    """The mixed-precision dtype for this device, or None for full float32.

    auto: bf16 on GPUs that run it natively (compute capability 8.0 or newer: Ampere, Ada, Hopper...),
    else fp16 (with a GradScaler). torch.cuda.is_bf16_supported() also says yes where bf16 is only
    emulated (T4, RTX 20xx: capability 7.5), and slow there. On the CPU bf16 for the backbone only,
    where the CPU has bf16 instructions (measured: benchmarks/throughput.py).
    With rine_scoring (TEST_CROP="rine"), auto is what RINE's code runs: OpenAI's clip.load gives an fp16
    CLIP on a GPU and a float32 one on the CPU.
    """
    if amp == "off":
        return None
    if amp == "auto" and rine_scoring:
        return torch.float16 if device.type == "cuda" else None
    if amp == "auto":
        if device.type == "cuda":
            native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
            return torch.bfloat16 if native_bf16 else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def head_amp_dtype(cfg, device):
    """The head's mixed-precision dtype when scoring: None (float32) under RINE's scoring, whose head runs
    in float32 on the backbone's tokens; else resolve_amp_dtype's."""
    return None if scores_as_rine(cfg) else resolve_amp_dtype(cfg.AMP, device)


def head_autocast(device, amp_dtype):
    """Autocast for the trainable head: on GPUs only. On the CPU only the backbone runs in bf16
    (measured: bf16 makes the backbone ~7x faster there, but the head ~15% slower: bf16 depthwise-conv
    backward is slow, and the FFTs need casts back to float32)."""
    return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None and device.type == "cuda")


def atomic_torch_save(obj, path):
    """torch.save, atomically (see atomic_write_bytes)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # via a buffer, so no temporary file name ends up inside the archive
    atomic_write_bytes(buffer.getbuffer(), path)


def atomic_write_bytes(data, path):
    """Write to a temporary file, fsync, then rename: a crash never leaves half a file.
    The file gets the usual permissions (0644 under the common umask 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp_path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def parse_block_list(spec, n_layers):
    """'all' | '0-11' | '4,8,12' -> sorted list of 0-based block indices."""
    if spec.strip().lower() == "all":
        return list(range(n_layers))
    blocks = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-"))
                blocks.update(range(lo, hi + 1))
            elif part:
                blocks.add(int(part))
        except ValueError:
            raise UserError(f"BLOCKS={spec!r} is not understood; use 'all', a range like '0-11' or a list like '4,8,12'.")
    if not blocks or min(blocks) < 0 or max(blocks) >= n_layers:
        raise UserError(f"BLOCKS={spec!r} must name blocks between 0 and {n_layers - 1} (the backbone has {n_layers}).")
    return sorted(blocks)


# =====================================================================================
# Losses: pure functions
# =====================================================================================

def supervised_contrastive_loss(features, labels, temperature=0.07, base_temperature=0.07):
    """SupCon (Khosla et al. 2020), single view.

    features [B, D] (any scale; L2-normalised here), labels [B] -> scalar.
    The anchor itself is excluded; an anchor without positives contributes 0 but still
    counts in the mean, as in the reference code. Computed in float32 even under autocast.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        features = F.normalize(features.float(), dim=1)
        batch = features.shape[0]
        if batch < 2:  # no pair at all: nothing to contrast, and a zero keeps the graph intact
            return features.sum() * 0.0
        labels = labels.reshape(-1, 1)
        logits = features @ features.T / temperature
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # stability only; cancels out
        not_self = ~torch.eye(batch, dtype=torch.bool, device=features.device)
        positives = (labels == labels.T) & not_self
        log_denominator = torch.log((torch.exp(logits) * not_self).sum(dim=1, keepdim=True))
        log_prob = logits - log_denominator
        positives_per_anchor = positives.sum(dim=1)
        mean_log_prob_pos = torch.where(positives, log_prob, 0.0).sum(dim=1) / positives_per_anchor.clamp(min=1)
        return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def bce_loss_sum(logits, labels):
    """BCE with logits summed over the batch, as RINE does (so its XI grid keeps its meaning)."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum")


# =====================================================================================
# Modules
# =====================================================================================

def load_clip_vision(name, dtype=None, attn_implementation="sdpa"):
    """CLIPVisionModel from a local folder or a HuggingFace id, with a clear message when it can't be had."""
    from transformers import CLIPVisionModel  # imported here so `import rine_plus_ssca` stays light
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are enough
    options = dict(attn_implementation=attn_implementation, dtype=dtype or torch.float32)
    fix = ("Set CLIP_MODEL / --clip-model (in Python: load_detector(..., clip_model=...)) to a folder saved with "
           "save_pretrained, or to a HuggingFace id such as openai/clip-vit-large-patch14 (downloaded once; the "
           "HF_ENDPOINT variable selects a mirror).")
    folder = Path(name).expanduser()
    if folder.is_dir():
        try:
            return CLIPVisionModel.from_pretrained(str(folder), **options)
        except Exception as error:
            raise UserError(f"The backbone folder {name} holds no loadable CLIP model ({first_line(error)}). {fix}") from error
    looks_like_path = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
    if looks_like_path:
        raise UserError(f"No backbone folder {name} (looked in {Path.cwd()}). {fix}")
    try:  # an id downloaded before loads from the local cache, without the network
        return CLIPVisionModel.from_pretrained(name, local_files_only=True, **options)
    except Exception:
        pass
    # One quick request first: huggingface_hub would otherwise retry for about half a minute without a network.
    unreachable = hub_problem(name)
    if unreachable:
        raise UserError(f"No backbone folder {name} in {Path.cwd()}, and as a HuggingFace id it could not be downloaded "
                        f"({unreachable}). {fix}")
    try:
        return CLIPVisionModel.from_pretrained(name, **options)
    except Exception as error:  # network, cache, or a repository without weights: all fixed the same ways
        raise UserError(f"Could not load the CLIP backbone {name!r} ({first_line(error)}). {fix}") from error


def first_line(error):
    """The first line of an exception's message (its type when empty), at most 160 characters."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:160]


def hub_problem(model_id):
    """Why the HuggingFace Hub can't serve `model_id` (one request, no retries), or None when it can."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(model_id, "config.json"), timeout=10)
    except OfflineModeIsEnabled:
        return "the Hub is switched off by HF_HUB_OFFLINE=1"
    except RepositoryNotFoundError:
        return "the Hub has no such model, or it is private or gated"
    except Exception as error:
        return f"{type(error).__name__}: {first_line(error)}"
    return None


class FrozenCLIPBlocks(nn.Module):
    """Frozen CLIP vision tower returning the CLS token of each chosen block.

    The token is taken at the output of each block's second LayerNorm (layer_norm2, the
    MLP input), as RINE does, with forward hooks. Blocks after the last one needed are
    removed, so no work is spent on them.
    pixels [B,3,H,W] -> cls_tokens [B,n_blocks,width], patch_tokens [B,width,g,g] or None.
    """

    def __init__(self, clip_model, blocks="all", patch_block=None, dtype=None, attn_implementation="sdpa", truncate=True):
        super().__init__()
        self.clip = load_clip_vision(clip_model, dtype, attn_implementation)
        vision = getattr(self.clip, "vision_model", self.clip)  # transformers 4 nests it; 5 does not
        layers = vision.encoder.layers
        self.backbone_config = self.clip.config.to_dict()
        self.width = self.clip.config.hidden_size
        self.grid = self.clip.config.image_size // self.clip.config.patch_size
        self.blocks = parse_block_list(blocks, len(layers))
        self.patch_block = patch_block
        if patch_block is not None and not 0 <= patch_block < len(layers):
            raise UserError(f"PATCH_BLOCK={patch_block} must be between 0 and {len(layers) - 1}.")
        last_needed = max(self.blocks + ([patch_block] if patch_block is not None else []))
        if truncate:  # blocks after the last one used would be computed for nothing
            vision.encoder.layers = layers[: last_needed + 1]
        self.clip.requires_grad_(False)
        self.clip.eval()
        self._caught = {}
        for index, layer in enumerate(vision.encoder.layers):
            layer.layer_norm2.register_forward_hook(self._make_hook(index))

    def _make_hook(self, index):
        def hook(module, inputs, output):
            if index in self.blocks:
                # A copy, not the view output[:, 0]: a view would keep the whole [B,257,width]
                # output alive until the forward ends (1.6 GB at batch 128 for ViT-L/14).
                self._caught[("cls", index)] = output[:, 0].clone()
            if index == self.patch_block:
                self._caught[("patches", index)] = output[:, 1:].clone()
        return hook

    def train(self, mode=True):
        """The backbone stays in eval mode whatever the parent's train() says."""
        return super().train(False)

    def forward(self, pixels):
        self._caught = {}
        with torch.no_grad():
            self.clip(pixel_values=pixels.to(self.clip.dtype))
        cls_tokens = torch.stack([self._caught[("cls", i)] for i in self.blocks], dim=1).float()
        patch_tokens = None
        if self.patch_block is not None:
            patches = self._caught[("patches", self.patch_block)].float()
            patch_tokens = patches.transpose(1, 2).reshape(patches.shape[0], self.width, self.grid, self.grid)
        self._caught = {}
        return cls_tokens, patch_tokens


def projection_mlp(in_dim, out_dim, n_layers, dropout):
    """RINE's Q: Dropout, then n_layers x [Linear, ReLU, Dropout]. [.., in_dim] -> [.., out_dim]."""
    layers = [nn.Dropout(dropout)]
    for i in range(n_layers):
        layers += [nn.Linear(in_dim if i == 0 else out_dim, out_dim), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def importance_weighted_sum(tokens, alpha):
    """RINE's Trainable Importance Estimator (TIE): sum over blocks of softmax(alpha) * tokens.

    tokens [B,n,d'], alpha [1,n,d'] (one weight per block and channel, softmax over blocks) -> [B,d'].
    alpha None (USE_TIE=False) gives the plain mean over blocks, which is what alpha = 0 gives.
    """
    if alpha is None:
        return tokens.mean(dim=1)
    return (alpha.softmax(dim=1) * tokens).sum(dim=1)


def rine_head(dim, dropout):
    """RINE's classifier on z: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear(d',1). [..,d'] -> [..,1]."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, 1))


def dct_matrix(n=8):
    """Orthonormal DCT-II basis, [n, n]: row k is the k-th cosine."""
    k = torch.arange(n, dtype=torch.float64).reshape(-1, 1)
    i = torch.arange(n, dtype=torch.float64).reshape(1, -1)
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.float()


class BlockDCT(nn.Module):
    """Fixed 8x8 block DCT of each colour channel in 0-255 pixels, log(1 + |c|), then BatchNorm.

    [B,3,H,W] (CLIP-normalised) -> [B,3*64,H/8,W/8]. Channel c*64 + 8u + v holds frequency
    (u, v) of colour c. The DCT is taken of 0-255 pixels, as in Frank et al. 2020: there the
    high-frequency coefficients, where upsampling leaves its traces, are mostly above 1, so
    the log really compresses them towards the DC term's scale. (On CLIP-normalised pixels
    they are about 70 times smaller and log1p would be nearly the identity.)
    """

    def __init__(self, block=8):
        super().__init__()
        basis = dct_matrix(block)
        filters = torch.einsum("ui,vj->uvij", basis, basis).reshape(block * block, 1, block, block)
        self.register_buffer("filters", filters.repeat(3, 1, 1, 1), persistent=False)
        # Undoes the CLIP normalisation: pixels * std + mean, times 255.
        self.register_buffer("pixel_scale", torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_offset", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.block = block
        self.norm = nn.BatchNorm2d(3 * block * block)

    def forward(self, pixels):
        with torch.autocast(device_type=pixels.device.type, enabled=False):  # small coefficients need float32
            pixels_255 = pixels.float() * self.pixel_scale + self.pixel_offset
            coefficients = F.conv2d(pixels_255, self.filters, stride=self.block, groups=3)
            return self.norm(torch.log1p(coefficients.abs()))


class DCTConvBlock(nn.Module):
    """Depthwise 7x7, GELU, depthwise 3x3 (residual), pointwise 1x1, BatchNorm; keeps H and W.

    [B,in_channels,H,W] -> [B,out_channels,H,W].
    """

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.depthwise7 = nn.Conv2d(in_channels, in_channels, 7, padding=3, groups=in_channels)
        self.depthwise3 = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = x + self.depthwise3(F.gelu(self.depthwise7(x)))  # residual keeps the raw spectrum reachable
        return self.norm(self.pointwise(x))


class SSCA(nn.Module):
    """Spectrum-Spatial Collaborative Attention: a spatial gate and a frequency gate on a real map, with a residual.

    Spatial: sigmoid(conv7x7([mean_c x; max_c x])) -> [B,1,H,W] (CBAM).
    Frequency: X = rfft2(x) [B,C,H,W/2+1]; X * filter * sigmoid(conv3x3([mean_c log1p|X|; max_c log1p|X|]))
    with a learned complex filter per (channel, frequency) (GFNet) and a data-dependent gate
    per frequency, then irfft2. Both vary over frequencies, so unlike one scalar per channel
    (which would be just x * w) they can favour some frequencies over others.
    x [B,C,H,W] -> [B,C,H,W].
    """

    def __init__(self, channels, height, width):
        super().__init__()
        self.spatial_conv = nn.Conv2d(2, 1, 7, padding=3)
        self.frequency_conv = nn.Conv2d(2, 1, 3, padding=1)
        filter_init = torch.zeros(channels, height, width // 2 + 1, 2)
        filter_init[..., 0] = 1.0  # start as the identity filter
        self.frequency_filter = nn.Parameter(filter_init + 0.02 * torch.randn_like(filter_init))
        self.spatial_weight = nn.Parameter(torch.tensor(0.5))
        self.frequency_weight = nn.Parameter(torch.tensor(0.5))

    @staticmethod
    def _pooled_over_channels(x):
        # max, not amax: max's backward scatters through the indices it kept, amax's compares the
        # whole map again (measured: the gates' pooling 30% cheaper); they differ only at exact ties
        return torch.cat([x.mean(dim=1, keepdim=True), x.max(dim=1, keepdim=True).values], dim=1)

    def spatial_gate(self, x):
        return torch.sigmoid(self.spatial_conv(self._pooled_over_channels(x)))  # [B,1,H,W]

    def spatial_path(self, x):
        return x * self.spatial_gate(x)

    @torch.compiler.disable  # inductor can't differentiate through the complex FFT path; it runs eagerly
    def frequency_path(self, x, weight=1.0):
        """irfft2(rfft2(x) * weight * filter * gate): x [B,C,H,W] -> [B,C,H,W] in float32."""
        height, width = x.shape[-2:]
        # Half-precision FFTs only work for power-of-two sizes, and 28 is not one.
        with torch.autocast(device_type=x.device.type, enabled=False):
            spectrum = torch.fft.rfft2(x.float(), norm="ortho")
            gate = torch.sigmoid(self.frequency_conv(self._pooled_over_channels(torch.log1p(spectrum.abs()))))
            spectrum = spectrum * (weight * torch.view_as_complex(self.frequency_filter.float())) * gate
            return torch.fft.irfft2(spectrum, s=(height, width), norm="ortho")

    def forward(self, x):
        # x + w_s * spatial_path(x) + w_f * frequency_path(x), arranged so that the weights scale the
        # small tensors (the [B,1,H,W] gate, the [C,H,W/2+1] filter): two passes over the map fewer.
        spatially_gated = x * (1 + self.spatial_weight * self.spatial_gate(x))
        return spatially_gated + self.frequency_path(x, self.frequency_weight).to(x.dtype)


SpectrumSpatialCollaborativeAttention = SSCA  # its long name, also importable


class OneQueryAttention(nn.Module):
    """Multi-head attention of ONE query vector over a set of tokens. query [B,dim], tokens [B,N,kv_dim] -> [B,dim].

    The same function as nn.MultiheadAttention with a single query, computed without
    projecting the N tokens: per head h, q_h . (W_k,h t) = (W_k,h^T q_h) . t, so the query is
    moved into token space instead, and sum_i a_i (W_v,h t_i + b_v,h) = W_v,h (sum_i a_i t_i) + b_v,h
    (the weights a_i sum to 1). For the 784 spectral tokens that is about 50x fewer
    multiply-adds and no [B,N,dim] key/value tensors. The key has no bias: it would add the
    same number to every score of a head, which the softmax ignores.
    """

    def __init__(self, dim, kv_dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim, bias=False)
        self.value = nn.Linear(kv_dim, dim)
        self.out = nn.Linear(dim, dim)
        for projection in (self.query, self.key, self.value):  # initialised as nn.MultiheadAttention does
            nn.init.xavier_uniform_(projection.weight)
        for layer in (self.query, self.value, self.out):
            nn.init.zeros_(layer.bias)

    def forward(self, query, tokens):
        batch, kv_dim = query.shape[0], tokens.shape[-1]
        q = self.query(query).view(batch, self.heads, self.head_dim) * self.head_dim ** -0.5
        key_weight = self.key.weight.view(self.heads, self.head_dim, kv_dim)
        value_weight = self.value.weight.view(self.heads, self.head_dim, kv_dim)
        query_in_token_space = torch.einsum("bhd,hdk->bhk", q, key_weight)
        weights = (query_in_token_space @ tokens.transpose(1, 2)).softmax(dim=-1)  # [B,heads,N]
        mixed_tokens = weights @ tokens  # [B,heads,kv_dim]: per head, one weighted mean of the tokens
        values = torch.einsum("bhk,hdk->bhd", mixed_tokens, value_weight).reshape(batch, -1) + self.value.bias
        return self.out(values)


class CrossAttentionCombination(nn.Module):
    """Two-way multi-head cross-attention between the branches.

    z_clip [B,d'] attends over the spectral map's tokens [B,H*W,C]; z_dct [B,C] attends over
    the block tokens [B,n,d'] (plus a learned embedding saying which block). -> z [B,D].
    """

    def __init__(self, clip_dim, spectral_dim, n_blocks, dim, heads):
        super().__init__()
        self.clip_query = nn.Linear(clip_dim, dim)
        self.spectral_query = nn.Linear(spectral_dim, dim)
        self.block_embedding = nn.Parameter(torch.zeros(1, n_blocks, clip_dim))
        self.clip_attends_spectrum = OneQueryAttention(dim, spectral_dim, heads)
        self.spectrum_attends_blocks = OneQueryAttention(dim, clip_dim, heads)
        self.out = nn.Sequential(nn.Linear(2 * dim, dim), nn.LayerNorm(dim))

    def forward(self, z_clip, block_tokens, z_dct, spectral_tokens):
        query_clip = self.clip_query(z_clip)
        query_dct = self.spectral_query(z_dct)
        from_spectrum = self.clip_attends_spectrum(query_clip, spectral_tokens)
        from_blocks = self.spectrum_attends_blocks(query_dct, block_tokens + self.block_embedding)
        return self.out(torch.cat([query_clip + from_spectrum, query_dct + from_blocks], dim=-1))


class GatedMLP(nn.Module):
    """x + W_out(GELU(W_main LN(x)) * sigmoid(W_gate LN(x))). [B,D] -> [B,D]."""

    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.main = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        h = self.norm(x)
        return x + self.dropout(self.out(F.gelu(self.main(h)) * torch.sigmoid(self.gate(h))))


# =====================================================================================
# Model
# =====================================================================================

class RINEPlusSSCA(nn.Module):
    """The detector. pixels [B,3,224,224] (CLIP-normalised) -> logits [B] (1 = fake), features [B,D].

    Only the head is trainable; `trainable_state_dict()` is what checkpoints store. The RINE part
    keeps RINE's parameter names (alpha, proj1, proj2). With USE_SPECTRAL=False the model is RINE
    as published: its head on z, features = z [B,d'] for SupCon, and exactly the keys of RINE's
    released checkpoints (alpha, proj1.*, proj2.*, head.*), so `import-rine` loads them unchanged.
    """

    def __init__(self, cfg, backbone_dtype=None, **backbone_options):
        super().__init__()
        # What the model is and how it scores (not the run's files, machine or optimisation): what load_detector
        # rebuilds it from. Dropout is a training setting: in eval mode the model's output does not depend on it.
        self.config = {name: getattr(cfg, name) for name in ARCHITECTURE_CONSTANTS + SCORING_CONSTANTS}
        # P(fake) = sigmoid(logit / temperature). Plain attributes, not parameters or buffers (the state dict
        # keeps RINE's keys): load_detector sets both from the checkpoint's calibration_record.
        self.temperature, self.calibration = 1.0, None
        use_patches = cfg.USE_SPECTRAL and cfg.SPECTRAL_INPUT == "clip_patches"
        self.backbone = FrozenCLIPBlocks(cfg.CLIP_MODEL, cfg.BLOCKS, cfg.PATCH_BLOCK if use_patches else None,
                                         backbone_dtype, **backbone_options)
        n_blocks, width, d = len(self.backbone.blocks), self.backbone.width, cfg.PROJ_DIM
        self.proj1 = projection_mlp(width, d, cfg.NPROJ, cfg.DROPOUT)  # Q1
        self.alpha = nn.Parameter(torch.randn(1, n_blocks, d)) if cfg.USE_TIE else None  # TIE, as RINE initialises it
        self.proj2 = projection_mlp(d, d, cfg.NPROJ, cfg.DROPOUT)  # Q2

        self.use_spectral = cfg.USE_SPECTRAL
        self.spectral_input = cfg.SPECTRAL_INPUT
        if not cfg.USE_SPECTRAL:  # RINE as published
            self.head = rine_head(d, cfg.DROPOUT)
            return
        # RINE+SSCA: the spectral branch, the fusion of both branches, and its own head.
        dim = cfg.FUSION_DIM
        if use_patches:
            self.spectral_stem, stem_channels, side = nn.BatchNorm2d(width), width, self.backbone.grid
        else:
            self.spectral_stem, stem_channels, side = BlockDCT(), 3 * 64, cfg.CROP_SIZE // 8
        self.dct_conv = DCTConvBlock(stem_channels, cfg.SPEC_CHANNELS)
        self.ssca = SpectrumSpatialCollaborativeAttention(cfg.SPEC_CHANNELS, side, side)
        if cfg.FUSION == "cross_attention":
            self.fusion = CrossAttentionCombination(d, cfg.SPEC_CHANNELS, n_blocks, dim, cfg.FUSION_HEADS)
        else:
            self.fusion = nn.Sequential(nn.Linear(d + cfg.SPEC_CHANNELS, dim), nn.LayerNorm(dim))
        self.gated_mlp = GatedMLP(dim, 2 * dim, cfg.DROPOUT)
        self.classifier = nn.Linear(dim, 1)
        self.supcon_projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def trainable_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def trainable_state_dict(self):
        """Everything but the frozen CLIP weights: what a checkpoint holds."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def block_importance(self):
        """TIE importance per block, softmax(alpha) averaged over channels: [n_blocks] (sums to 1)."""
        if self.alpha is None:
            return torch.full((len(self.backbone.blocks),), 1.0 / len(self.backbone.blocks))
        return self.alpha.detach().float().softmax(dim=1)[0].mean(dim=1).cpu()

    def forward(self, pixels, cls_tokens=None):
        """cls_tokens [B,n_blocks,width], when given (from the feature cache), replace the backbone's forward."""
        z_clip, block_tokens, spectral_map = self.branches(pixels, cls_tokens)
        if not self.use_spectral:  # RINE: logit from its head, SupCon on z itself
            return self.head(z_clip).squeeze(1), z_clip
        representation = self.fused_representation(z_clip, block_tokens, spectral_map)
        return self.classifier(representation).squeeze(1), self.supcon_projection(representation)

    def branches(self, pixels, cls_tokens=None):
        """(z_clip [B,d'], block_tokens [B,n,d'], spectral_map [B,C,h,w] or None without the spectral branch)."""
        patch_tokens = None
        if cls_tokens is None:
            cls_tokens, patch_tokens = self.backbone(pixels)
        block_tokens = self.proj1(cls_tokens)  # Q1: [B,n,d'], one network shared by all blocks
        z_clip = self.proj2(importance_weighted_sum(block_tokens, self.alpha))  # Q2 of the TIE sum: [B,d']
        if not self.use_spectral:
            return z_clip, block_tokens, None
        stem_input = patch_tokens if self.spectral_input == "clip_patches" else pixels
        return z_clip, block_tokens, self.ssca(self.dct_conv(self.spectral_stem(stem_input)))

    def fused_representation(self, z_clip, block_tokens, spectral_map):
        """Both branches fused, then the gated MLP: [B,D]."""
        z_dct = spectral_map.mean(dim=(2, 3))  # [B,C]
        if isinstance(self.fusion, CrossAttentionCombination):
            spectral_tokens = spectral_map.flatten(2).transpose(1, 2)  # [B,h*w,C]
            z = self.fusion(z_clip, block_tokens, z_dct, spectral_tokens)
        else:
            z = self.fusion(torch.cat([z_clip, z_dct], dim=1))
        return self.gated_mlp(z)

    @torch.inference_mode()
    def local_logits(self, pixels):
        """(the image's logit [1], the logit of each position of its spectral map [h,w]) for pixels [1,3,H,W].

        The image's CLIP branch is kept; the spectral map is replaced by one position's token, so the
        head answers "is the image fake, given that its spectrum looks like this everywhere?". A token is
        not local to its 8x8 block: SSCA's spatial gate and global frequency filter reach the whole crop
        (measured by gradients on the demo: 90% of a centre token's within 81x81 pixels, 99% within
        212x212; docs/GUIDE.md 4.8).
        """
        z_clip, block_tokens, spectral_map = self.branches(pixels)
        logit = self.classifier(self.fused_representation(z_clip, block_tokens, spectral_map)).float().view(1)
        channels, height, width = spectral_map.shape[1:]
        positions = height * width
        one_token_maps = spectral_map[0].flatten(1).t().reshape(positions, channels, 1, 1)
        representation = self.fused_representation(z_clip.expand(positions, -1),
                                                   block_tokens.expand(positions, -1, -1), one_token_maps)
        return logit, self.classifier(representation).float().view(height, width)


def trainable_parameter_counts(model):
    """{top-level name: trainable parameter count} for the head's modules (and alpha)."""
    counts = {}
    for name, p in model.named_parameters():
        if not name.startswith("backbone."):
            top = name.split(".")[0]
            counts[top] = counts.get(top, 0) + p.numel()
    return counts


# =====================================================================================
# Data: labels from folder names, augmentation, loaders
# =====================================================================================

REAL_FOLDER_NAMES = {"0_real", "real", "nature"}
FAKE_FOLDER_NAMES = {"1_fake", "fake", "ai"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def label_from_parts(parts):
    """(label, index of the label folder) for the nearest label folder in `parts`, or (None, None)."""
    for index in range(len(parts) - 1, -1, -1):
        name = parts[index].lower()
        if name in REAL_FOLDER_NAMES:
            return 0, index
        if name in FAKE_FOLDER_NAMES:
            return 1, index
    return None, None


def scan_image_folder(root):
    """Every image under root with its label and group.

    Returns (items, unlabeled): items are (path, label, group) where group is the folder path
    between root and the label folder ("car", "biggan", "sdv4/val"; "." when the label folder
    sits directly under root); unlabeled lists images under no label folder.
    """
    root = Path(root)
    items, unlabeled = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        parts = Path(dirpath).relative_to(root).parts
        label, label_index = label_from_parts(parts)
        for filename in sorted(filenames):
            if Path(filename).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, filename)
            if label is None:
                unlabeled.append(path)
            else:
                items.append((path, label, "/".join(parts[:label_index]) or "."))
    return items, unlabeled


def filter_classes(items, train_classes, folder=None):
    """Keep items whose group path contains one of the comma-separated folder names.

    With `folder` (the training set's), a name that matches no folder there is refused: a typo
    would otherwise silently train on fewer classes.
    """
    wanted = {name.strip() for name in train_classes.split(",") if name.strip()}
    if not wanted:
        return items
    present = {part for item in items for part in item[2].split("/")} - {"."}
    unknown = sorted(wanted - present)
    if folder is not None and unknown and items:  # no items at all is reported by the caller
        names = sorted(present)
        raise UserError(f"TRAIN_CLASSES names {', '.join(unknown)}: no such folder under {folder} (names are "
                        f"case-sensitive). Folders there: {', '.join(names[:30]) or 'none'}"
                        + (f" and {len(names) - 30} more." if len(names) > 30 else "."))
    return [item for item in items if wanted & set(item[2].split("/"))]


def stratified_holdout(items, fraction, seed):
    """Seeded split keeping each (group, label) in the same proportion on both sides."""
    rng = random.Random(seed)
    strata = {}
    for item in items:
        strata.setdefault((item[2], item[1]), []).append(item)
    train, val = [], []
    for key in sorted(strata):
        members = strata[key][:]
        rng.shuffle(members)
        n_val = int(round(fraction * len(members)))
        val += members[:n_val]
        train += members[n_val:]
    return train, val


def count_table(items):
    """Rows of (group, n_real, n_fake) plus a total row."""
    counts = {}
    for _, label, group in items:
        counts.setdefault(group, [0, 0])[label] += 1
    rows = [(group, real, fake) for group, (real, fake) in sorted(counts.items())]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    return rows


def open_image(path):
    """Decode an image file fully into 8-bit RGB; a decompression bomb is an error, not a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            return load_rgb(image)


def load_rgb(source):
    """A path or PIL image -> 8-bit RGB PIL image (16-bit, palette, RGBA, CMYK, grayscale all handled)."""
    image = source if isinstance(source, Image.Image) else Image.open(source)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale, don't clip
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / 257.0, 0, 255).astype(np.uint8))
    elif image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB")


def jpeg_reencode(image, quality):
    """Save as JPEG at `quality` (1-100) and decode again."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


GRID = 8  # the DCT's block side, and JPEG's: every crop starts on a multiple of it in the image
JPEG_MCU = 16  # JPEG's largest block (colour subsampled 2x): re-encoded windows start on multiples of it


def on_grid(value, step=GRID):
    """The largest multiple of `step` not above `value` (value >= 0)."""
    return value // step * step


def crop_origins(length, crop, step=GRID):
    """Every crop start on the `step`-pixel grid (1: any pixel) that keeps the crop inside `length` (>= crop) pixels."""
    return range(0, length - crop + 1, step)


def gaussian_blur_as_rine(image, sigma):
    """RINE's blur: SciPy's gaussian_filter on each uint8 channel, written back into uint8. (Pillow's
    GaussianBlur, the grid recipe's, approximates a Gaussian with box blurs, so its pixels differ slightly.)"""
    from scipy.ndimage import gaussian_filter

    pixels = np.array(image.convert("RGB"))
    for channel in range(3):
        gaussian_filter(pixels[:, :, channel], output=pixels[:, :, channel], sigma=sigma)
    return Image.fromarray(pixels)


class TrainAugment:
    """Training view of one image, every random choice drawn from `generator`, so a seed fixes the view.

    draw() makes the random choices, apply() carries them out, so the choices can be inspected
    without encoding a JPEG. Gaussian blur (p, sigma~U[0,max]), JPEG re-encoding (p), a random crop
    (smaller images are mirror-padded first, never resized) and a horizontal flip -> uint8 array
    [3,crop,crop]. The recipe (TRAIN_RECIPE) decides the rest:
    - "grid": JPEG quality ~ U{min..100} as CNNDetection draws it; the crop's origin is on the
      image's 8-pixel grid, as the test crops are, so the spectral branch's 8x8 DCT blocks sit on
      the image's (and JPEG's) blocks in training and testing alike.
    - "rine": RINE's data_augment: SciPy's gaussian_filter per channel on the uint8 pixels, as RINE
      blurs; JPEG quality min or 100 (RINE's sample_discrete([30, 100])); the crop at any pixel, as
      torchvision's RandomCrop. RINE also picks OpenCV or Pillow to encode; both give byte-identical
      JPEGs (benchmarks/jpeg_encoders.py), so Pillow alone is used.

    Blur and JPEG run on a window around the crop, not the whole image, so a large image costs
    little more than its decoding: the window reaches `margin` pixels beyond the crop (more
    than the blur's reach plus one JPEG block) and starts on JPEG's 16-pixel grid, so the crop
    comes out the same as if the whole image had been blurred and re-encoded. An image no
    larger than the crop plus the margins (256 px ones) is its own window.
    whole_image=True augments the whole image instead (for comparisons).
    """

    def __init__(self, cfg, whole_image=False):
        self.crop, self.recipe = cfg.CROP_SIZE, cfg.TRAIN_RECIPE
        self.blur_prob, self.blur_sigma_max = cfg.BLUR_PROB, cfg.BLUR_SIGMA_MAX
        self.jpeg_prob, self.jpeg_quality_min = cfg.JPEG_PROB, cfg.JPEG_QUALITY_MIN
        blur_reach = math.ceil(4 * self.blur_sigma_max) + 1  # SciPy's kernel reaches 4 sigma, Pillow's less
        self.margin = None if whole_image else JPEG_MCU * math.ceil((blur_reach + JPEG_MCU + 2) / JPEG_MCU)

    def __call__(self, image, generator):
        return self.apply(image, self.draw(image.width, image.height, generator))

    def draw(self, width, height, generator):
        """The random choices for a width x height image: sigma (0 = no blur), quality (None = no JPEG),
        the crop's left and top in the image (negative on a mirror-padded side) and flip."""
        def uniform():
            return torch.rand(1, generator=generator).item()

        def pick(choices):
            return choices[int(torch.randint(0, len(choices), (1,), generator=generator))]

        # Blur and JPEG are decided independently, each with its own probability, as in RINE.
        sigma = uniform() * self.blur_sigma_max if uniform() < self.blur_prob else 0.0
        quality = None
        if uniform() < self.jpeg_prob:
            if self.recipe == "rine":
                quality = pick((self.jpeg_quality_min, 100))
            else:
                quality = torch.randint(self.jpeg_quality_min, 101, (1,), generator=generator).item()
        # The crop, in the coordinates of the image padded to at least crop x crop.
        step = 1 if self.recipe == "rine" else GRID
        pad_left, pad_top = PadToAtLeast.left_top(self.crop, width, height)
        top = pick(crop_origins(max(height, self.crop), self.crop, step)) - pad_top
        left = pick(crop_origins(max(width, self.crop), self.crop, step)) - pad_left
        return SimpleNamespace(sigma=sigma, quality=quality, left=left, top=top, flip=uniform() < 0.5)

    def apply(self, image, view):
        """Blur, re-encode, crop and flip `image` as `view` (from draw) says."""
        left, top = view.left, view.top
        window = (0, 0, image.width, image.height)
        if self.margin is not None:
            window = (max(0, on_grid(left - self.margin, JPEG_MCU)), max(0, on_grid(top - self.margin, JPEG_MCU)),
                      min(image.width, left + self.crop + self.margin), min(image.height, top + self.crop + self.margin))
            if window != (0, 0, image.width, image.height):
                image = image.crop(window)
        if view.sigma > 0:
            image = gaussian_blur_as_rine(image, view.sigma) if self.recipe == "rine" else \
                image.filter(ImageFilter.GaussianBlur(radius=view.sigma))
        if view.quality is not None:
            image = jpeg_reencode(image, view.quality)
        # A window narrower than the crop is the whole image on that side, padded as the whole image would be.
        image = PadToAtLeast(self.crop)(image)
        window_left, window_top = PadToAtLeast.left_top(self.crop, window[2] - window[0], window[3] - window[1])
        x, y = left - window[0] + window_left, top - window[1] + window_top
        pixels = np.asarray(image.crop((x, y, x + self.crop, y + self.crop)), dtype=np.uint8)
        if view.flip:  # keeps the grid: the crop side is a multiple of 8
            pixels = pixels[:, ::-1]
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def normalise_uint8(pixels):
    """uint8 [..., 3, H, W] -> CLIP-normalised float32, on whatever device the tensor is."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


class FixedPerturbation:
    """The same resize (factor), blur (sigma) and/or JPEG (quality) for every image: robustness tests, no randomness.

    In the order a photo meets them on the web: rescaled, then (blurred and) recompressed. The
    resize is bicubic with antialiasing (PIL widens the filter when it shrinks), as image
    editors and sharing sites rescale; a plain bilinear or nearest downscale would alias and
    add traces of its own.
    """

    def __init__(self, jpeg_quality=None, blur_sigma=None, resize=None):
        self.jpeg_quality, self.blur_sigma, self.resize = jpeg_quality, blur_sigma, resize

    def __call__(self, image):
        if self.resize is not None and self.resize != 1:
            size = (max(1, round(image.width * self.resize)), max(1, round(image.height * self.resize)))
            image = image.resize(size, Image.BICUBIC)
        if self.blur_sigma:
            image = image.filter(ImageFilter.GaussianBlur(radius=self.blur_sigma))
        if self.jpeg_quality is not None:
            image = jpeg_reencode(image, self.jpeg_quality)
        return image


class PadToAtLeast:
    """Mirror-pad so both sides are at least `size`; larger images are left alone.

    A mirror image of the picture, not a black border: a border that only small images have
    (e.g. 128 px BigGAN fakes next to large real photos) would tell the detector the class.
    The left and top pads are multiples of 8, so the image's 8-pixel grid stays the crop's grid.
    The mirror repeats the edge pixel (numpy's "symmetric"), so each padded 8x8 block is the mirror
    of one image block; "reflect" leaves the edge pixel out, and its blocks would straddle two.
    """

    def __init__(self, size):
        self.size = size

    @staticmethod
    def left_top(size, width, height):
        """(left, top) padding of a width x height image."""
        return on_grid(max(0, size - width) // 2), on_grid(max(0, size - height) // 2)

    def __call__(self, image):
        pad_w, pad_h = max(0, self.size - image.width), max(0, self.size - image.height)
        if not (pad_w or pad_h):
            return image
        left, top = self.left_top(self.size, image.width, image.height)
        pixels = np.pad(np.asarray(image), ((top, pad_h - top), (left, pad_w - left), (0, 0)), mode="symmetric")
        return Image.fromarray(pixels)


def to_uint8_tensor(image):
    """PIL RGB image -> uint8 tensor [3,H,W] (normalised later, on the device: 4x less to copy)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))


class CentreCrop:
    """Mirror-pad to at least `size`, then the central size x size window, its origin rounded
    down to the 8-pixel grid (so the DCT's blocks sit on the image's, as in training)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        image = PadToAtLeast(self.size)(image)
        top, left = on_grid((image.height - self.size) // 2), on_grid((image.width - self.size) // 2)
        return image.crop((left, top, left + self.size, top + self.size))


class TenCrops:
    """RINE's ten crops on the 8-pixel grid: four corners (the far ones rounded down to the grid),
    the centre, and the mirror image of each. -> tuple of 10 PIL crops."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        image = PadToAtLeast(self.size)(image)
        right, bottom = on_grid(image.width - self.size), on_grid(image.height - self.size)
        centre_top, centre_left = on_grid((image.height - self.size) // 2), on_grid((image.width - self.size) // 2)
        origins = [(0, 0), (right, 0), (0, bottom), (right, bottom), (centre_left, centre_top)]
        crops = [image.crop((x, y, x + self.size, y + self.size)) for x, y in origins]
        return tuple(crops + [crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for crop in crops])


class ZeroPadToAtLeast:
    """Zero-pad so both sides are at least `size`, split as torchvision's CenterCrop pads a small image (so
    the centre of ten crops is CenterCrop's crop). RINE's code has no case for small images: its TenCrop
    raises on them; padded first, they are scored as its CenterCrop would see them."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        from torchvision.transforms import functional

        if image.width >= self.size and image.height >= self.size:
            return image
        return functional.center_crop(image, [max(self.size, image.height), max(self.size, image.width)])


class StackCrops:
    """A tuple of PIL crops -> uint8 tensor [10,3,H,W]."""

    def __call__(self, crops):
        return torch.stack([to_uint8_tensor(crop) for crop in crops])


def build_transform(cfg, train, jpeg_quality=None, blur_sigma=None, tencrop=False, resize=None):
    """Test: PIL image -> uint8 tensor [3,CROP,CROP] ([10,3,CROP,CROP] with tencrop).

    An optional fixed perturbation, then a centre crop (or the ten crops RINE averages over
    for large images), on the 8-pixel grid as the training crops are; never a resize. Train:
    the seeded TrainAugment. Both give uint8 pixels, normalised on the device by normalise_uint8.
    """
    from torchvision import transforms

    if train:
        return TrainAugment(cfg)
    perturbed = jpeg_quality is not None or blur_sigma or resize is not None
    steps = [FixedPerturbation(jpeg_quality, blur_sigma, resize)] if perturbed else []
    if cfg.TEST_CROP == "rine" and tencrop:  # RINE's test preprocessing, so its released weights give its numbers
        steps += [ZeroPadToAtLeast(cfg.CROP_SIZE), transforms.TenCrop(cfg.CROP_SIZE), StackCrops()]
    elif cfg.TEST_CROP == "rine":
        steps += [transforms.CenterCrop(cfg.CROP_SIZE), to_uint8_tensor]
    elif tencrop:
        steps += [TenCrops(cfg.CROP_SIZE), StackCrops()]
    else:
        steps += [CentreCrop(cfg.CROP_SIZE), to_uint8_tensor]
    return transforms.Compose(steps)


class Sample(NamedTuple):
    """One image as ImageDataset gives it to collate_skipping_bad."""
    pixels: torch.Tensor  # uint8 [3,S,S] ([10,3,S,S] with ten crops); None when the file can't be read
    label: int  # 0 real, 1 fake
    index: int  # in the dataset's list of items
    view: int  # which augmented view (the feature cache keeps several per image)
    tokens: torch.Tensor = None  # the backbone's CLS tokens [n,width] when the feature cache held them
    error: str = None  # why the file can't be read
    damaged: bool = False  # a cached entry failed its CRC check (counted in the main process: workers can't report it)


class ImageDataset(torch.utils.data.Dataset):
    """(path, label, group) items -> samples for collate_skipping_bad.

    dataset[i] applies the test transform; dataset[(i, seed, view)] the training one seeded
    with `seed` (seed None: the test transform). With a FeatureCache, a valid cached entry of
    (i, view) is returned instead of decoding the file, tokens included. Each item is a Sample.
    """

    def __init__(self, items, transform, cache=None):
        # NumPy arrays rather than lists of Python objects: workers don't copy them page by page.
        self.paths = np.array([item[0] for item in items])
        self.labels = np.array([item[1] for item in items], dtype=np.int64)
        self.transform = transform
        self.cache = cache

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        index, seed, view = key if isinstance(key, tuple) else (key, None, 0)
        label = int(self.labels[index])
        damaged = False
        if self.cache is not None:
            cached = self.cache.get(index, view)
            if cached is not None:
                return Sample(cached[0], label, index, view, tokens=cached[1])
            damaged = self.cache.state(index, view) == self.cache.FILLED  # filled, yet it failed its CRC check
        path = str(self.paths[index])
        try:
            image = open_image(path)
            if seed is None:
                pixels = self.transform(image)
            else:
                pixels = torch.from_numpy(self.transform(image, torch.Generator().manual_seed(seed)))
        except Exception as error:  # truncated, empty, not an image, decompression bomb...
            return Sample(None, label, index, view, error=f"{type(error).__name__}: {error}", damaged=damaged)
        return Sample(pixels, label, index, view, damaged=damaged)


class Batch(NamedTuple):
    """A collated batch of the readable samples. DataLoader(pin_memory=True) pins each of its tensors in
    page-locked memory (it does so for every field of a NamedTuple), so their copy to the GPU overlaps compute."""
    pixels: torch.Tensor  # uint8 [B,3,S,S] (or [B,10,3,S,S]); None when no sample was readable
    labels: torch.Tensor  # float32 [B], 1 = fake
    indices: torch.Tensor  # [B], in the dataset's list of items
    views: torch.Tensor  # [B]
    tokens: torch.Tensor = None  # cached CLS tokens [B,n,width] (zeros where not cached); None when none was cached
    cached: torch.Tensor = None  # bool [B]: which rows of tokens came from the cache
    bad: list = ()  # [(index, error text)] of the unreadable samples
    n_damaged: int = 0  # cache entries that failed their check and are recomputed


def collate_skipping_bad(samples):
    """Stack the readable samples; unreadable ones go to batch.bad. batch.pixels is None when none were readable."""
    good = [sample for sample in samples if sample.pixels is not None]
    bad = [(sample.index, sample.error) for sample in samples if sample.pixels is None]
    n_damaged = sum(sample.damaged for sample in samples)
    if not good:
        return Batch(None, None, None, None, bad=bad, n_damaged=n_damaged)
    cached = torch.tensor([sample.tokens is not None for sample in good])
    tokens = None
    if cached.any():
        shape = next(sample.tokens for sample in good if sample.tokens is not None).shape
        tokens = torch.stack([sample.tokens if sample.tokens is not None else torch.zeros(shape) for sample in good])
    return Batch(
        pixels=torch.stack([sample.pixels for sample in good]),
        labels=torch.tensor([sample.label for sample in good], dtype=torch.float32),
        indices=torch.tensor([sample.index for sample in good]),
        views=torch.tensor([sample.view for sample in good]),
        tokens=tokens, cached=cached, bad=bad, n_damaged=n_damaged)


def sample_seed(seed, index, view):
    """Seed of one augmented view of one image: the same (SEED, image, view) always gives the same pixels."""
    return (seed * 1_000_003 + index) * 1_000_033 + view


class SeededEpochSampler(torch.utils.data.Sampler):
    """Shuffled (index, augmentation seed, view) triples fixed by (SEED, epoch).

    A resumed epoch replays exactly the same batches from `start_batch` on, whatever the
    number of workers, because nothing depends on worker RNG. Epoch e draws view e-1 of each
    image, or view (e-1) mod n_views when the feature cache holds n_views views. Under
    torchrun each of the `world_size` processes takes every world_size-th sample of the
    global order, so a global batch is the same set of images as in one process.
    """

    def __init__(self, n_items, seed, batch_size, drop_last, n_views=None, rank=0, world_size=1, view_seed=None):
        self.n_items, self.seed, self.batch_size, self.drop_last = n_items, seed, batch_size, drop_last
        self.view_seed = seed if view_seed is None else view_seed  # DATA_SEED: the views, apart from the order
        self.n_views, self.rank, self.world_size = n_views, rank, world_size
        self.epoch, self.start_batch = 1, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self):
        full, rest = divmod(self.n_items, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def _order(self):
        order = torch.randperm(self.n_items, generator=torch.Generator().manual_seed(self.seed * 10_007 + self.epoch))
        order = order[: self.batches_per_epoch() * self.batch_size][self.start_batch * self.batch_size:]
        return order[self.rank::self.world_size]

    def __len__(self):
        return len(self._order())

    def __iter__(self):
        view = self.epoch - 1 if self.n_views is None else (self.epoch - 1) % self.n_views
        return iter([(int(i), sample_seed(self.view_seed, int(i), view), view) for i in self._order()])


def _worker_ignores_stop_signals(worker_id, main_process=None):
    """Data workers ignore Ctrl-C, and SIGTERM from anyone but the main process.

    A terminal's Ctrl-C and a scheduler's SIGTERM reach every process of the run (its process group,
    or all processes of the job); the workers keep serving batches while the main process finishes
    its step, saves and shuts them down. The main process's own SIGTERM still ends a worker: Python
    sends it to workers left alive at exit (then waits for them), so a worker that ignored it would
    keep the run from ever ending. A thread tells the senders apart (sigwaitinfo names the sender);
    `main_process` is the main process's id where it is not the worker's parent (a forkserver).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Blocking SIGTERM for the thread below only works while this is the process's one thread (a
    # forked worker); otherwise (spawned workers, macOS) the worker leaves the process group instead:
    # group signals then miss it, and any SIGTERM ends it.
    threads = Path(f"/proc/{os.getpid()}/task")
    if not (hasattr(signal, "sigwaitinfo") and threads.is_dir() and len(list(threads.iterdir())) == 1):
        if hasattr(os, "setpgrp"):
            os.setpgrp()
        return
    main_processes = {os.getppid(), main_process or os.getppid()}
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def end_when_the_main_process_asks():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid not in main_processes:
            pass
        os._exit(0)

    threading.Thread(target=end_when_the_main_process_asks, daemon=True).start()


def batch_bytes(dataset, batch_size, crop_size):
    """Bytes of one collated batch: uint8 crops (ten per image with ten-crop), plus cached float32 tokens."""
    crops = 10 if any(isinstance(step, StackCrops) for step in getattr(dataset.transform, "transforms", [])) else 1
    tokens = 0 if dataset.cache is None else int(np.prod(dataset.cache.shapes["tokens"][2:])) * 4
    return batch_size * (crops * 3 * crop_size ** 2 + tokens)


def workers_within_shared_memory(workers, bytes_per_batch, prefetch_factor, shm="/dev/shm"):
    """As many data workers as /dev/shm holds, with a warning when that is fewer than asked.

    Workers hand their batches over in shared memory: workers x prefetch_factor batches can be
    waiting at once (8 x 4 x 19 MB at batch 128 = 0.6 GB), and running out is a bus error.
    Docker gives a container 64 MB by default. Fewer workers change only the speed, never the
    result (each sample's augmentation seed comes from the sampler), so the run goes on with them.
    """
    try:
        stats = os.statvfs(shm)
    except (OSError, AttributeError):  # no /dev/shm (macOS, Windows): PyTorch uses other means there
        return workers
    free = stats.f_bavail * stats.f_frsize
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's processes on this machine share it
    per_worker = prefetch_factor * bytes_per_batch * processes
    if workers == 0 or workers * per_worker <= free:
        return workers
    fitting = int(free // per_worker)
    print(f"warning: {workers} data workers x prefetch {prefetch_factor} x {bytes_per_batch / 1e6:.0f} MB batches"
          f"{f' x {processes} processes' if processes > 1 else ''} need {workers * per_worker / 1e9:.2f} GB of shared "
          f"memory, but {shm} has {free / 1e9:.2f} GB free; using {fitting} workers (slower, same results). "
          f"Pass --num-workers {fitting} to silence this, or give it more (Docker: docker run --shm-size=4g ...).")
    return fitting


def make_loader(items, cfg, train, device, transform=None, sampler=None, cache=None, batch_size=None):
    """DataLoader over (path, label, group) items; test transform unless `sampler` gives training seeds."""
    dataset = ImageDataset(items, transform or build_transform(cfg, train), cache)
    batch_size, prefetch_factor = batch_size or cfg.BATCH_SIZE, 4
    workers = max(0, min(cfg.NUM_WORKERS, os.cpu_count() or 1))
    workers = workers_within_shared_memory(workers, batch_bytes(dataset, batch_size, cfg.CROP_SIZE), prefetch_factor)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        collate_fn=collate_skipping_bad,
        worker_init_fn=functools.partial(_worker_ignores_stop_signals, main_process=os.getpid()),
        generator=torch.Generator().manual_seed(0),  # its own RNG: starting an epoch leaves torch's global RNG alone
    )


def shut_down_workers(*loaders):
    """End the loaders' worker processes now, rather than whenever the loaders are garbage-collected."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # persistent workers live in the loader's iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        loader._iterator = None


class BadImageLog:
    """Reports each unreadable file once; `check` stops the run when a split has too many of them.

    `n_images` is the split's size when `paths` is one process's shard of it (torchrun).
    """

    def __init__(self, split_name, paths, max_fraction, n_images=None):
        self.split_name, self.paths, self.max_fraction = split_name, paths, max_fraction
        self.n_images = len(paths) if n_images is None else n_images
        self.bad = {}

    def add(self, bad, write=print):
        for index, error in bad:
            path = str(self.paths[index])
            if path not in self.bad:
                self.bad[path] = error
                write(f"warning: skipped unreadable image {path} ({error})")

    def too_many(self, n_bad):
        return n_bad > self.max_fraction * self.n_images

    def check(self, bad_paths=None):
        """UserError when too many images are unreadable; `bad_paths`: those found by all processes."""
        bad_paths = list(self.bad) if bad_paths is None else bad_paths
        if self.too_many(len(bad_paths)):
            examples = "; ".join(bad_paths[:3])
            raise UserError(f"{len(bad_paths)} of {self.n_images} {self.split_name} images are unreadable (more than "
                            f"MAX_BAD_FRACTION={self.max_fraction}), e.g. {examples}. Run `python rine_plus_ssca.py "
                            "check-data --data DIR` to list them, then remove or re-download them.")


def calibration_items(val_items, cfg):
    """The validation images kept apart for the temperature and the threshold: a seeded, stratified
    CALIBRATION_FRACTION of them ([] when it is 0)."""
    if cfg.CALIBRATION_FRACTION == 0:
        return []
    return stratified_holdout(val_items, cfg.CALIBRATION_FRACTION, cfg.DATA_SEED)[1]


def prepare_splits(cfg):
    """(train_items, val_items) from DATA_DIR, with counts printed and mistakes explained."""
    data_dir = Path(cfg.DATA_DIR)
    train_dir, val_dir = data_dir / "train", Path(cfg.VAL_DIR) if cfg.VAL_DIR else data_dir / "val"
    if cfg.VAL_DIR and not val_dir.is_dir():
        raise UserError(f"No folder {val_dir} for VAL_DIR; give a folder holding <...>/0_real|1_fake, or leave VAL_DIR "
                        "empty to use DATA_DIR/val.")
    if not train_dir.is_dir():
        raise UserError(f"No training folder {train_dir}/. Put images under {train_dir}/<...>/0_real|1_fake "
                        "(or real|fake, nature|ai), or set --data-dir; try --demo for a generated example.")
    train_items, unlabeled = scan_image_folder(train_dir)
    if unlabeled:
        print(f"note: {len(unlabeled)} images under {train_dir} sit in no real/fake folder and are ignored, e.g. {unlabeled[0]}")
    held_out = filter_classes(train_items, cfg.VAL_CLASSES) if cfg.VAL_CLASSES else []
    train_items = filter_classes(train_items, cfg.TRAIN_CLASSES, folder=train_dir)
    if cfg.VAL_CLASSES:  # generators kept for validation never reach training
        held_out_paths = {item[0] for item in held_out}
        train_items = [item for item in train_items if item[0] not in held_out_paths]
    if not train_items:
        raise UserError(f"No labelled images under {train_dir}" + (f" for TRAIN_CLASSES={cfg.TRAIN_CLASSES!r}" if cfg.TRAIN_CLASSES else "")
                        + (f" outside VAL_CLASSES={cfg.VAL_CLASSES!r}" if cfg.VAL_CLASSES else "")
                        + ". Labels come from folder names: 0_real/real/nature and 1_fake/fake/ai.")
    val_items = scan_image_folder(val_dir)[0] if val_dir.is_dir() else []
    if cfg.VAL_CLASSES:
        from_val_dir = filter_classes(val_items, cfg.VAL_CLASSES)
        val_items = from_val_dir or held_out
        if not val_items:
            raise UserError(f"VAL_CLASSES={cfg.VAL_CLASSES!r} names no folder holding labelled images under "
                            f"{val_dir if val_dir.is_dir() else train_dir}; name generator or category folders found there.")
        val_source = f"VAL_CLASSES={cfg.VAL_CLASSES!r}, kept out of training, from {val_dir if from_val_dir else train_dir}"
    elif val_dir.is_dir():
        val_items = filter_classes(val_items, cfg.TRAIN_CLASSES) or val_items
        val_source = str(val_dir)
    else:
        train_items, val_items = stratified_holdout(train_items, cfg.VAL_FRACTION, cfg.DATA_SEED)
        val_source = f"a {cfg.VAL_FRACTION:.0%} stratified hold-out of {train_dir} (DATA_SEED {cfg.DATA_SEED})"
    for name, split in (("train", train_items), ("validation", val_items)):
        rows = count_table(split)
        print(f"\n{name} images ({val_source if name == 'validation' else train_dir}):")
        print(format_table(["folder", "real", "fake"], rows))
        real, fake = rows[-1][1], rows[-1][2]
        if real == 0 or fake == 0:
            missing = "real (0_real/real/nature)" if real == 0 else "fake (1_fake/fake/ai)"
            raise UserError(f"The {name} set has no {missing} images; a detector needs both classes. "
                            f"Add a folder of {missing.split(' ')[0]} images next to the other one.")
    if cfg.CALIBRATION_FRACTION > 0:
        kept_apart = calibration_items(val_items, cfg)
        labels = [label for _, label, _ in kept_apart]
        if 0 not in labels or 1 not in labels:
            raise UserError(f"CALIBRATION_FRACTION={cfg.CALIBRATION_FRACTION} keeps {labels.count(0)} real and "
                            f"{labels.count(1)} fake validation images apart for the calibration; it needs both. Raise "
                            "it, add validation images, or set it to 0.")
        print(f"calibration: {len(kept_apart)} of the {len(val_items)} validation images ({labels.count(0)} real, "
              f"{labels.count(1)} fake) are kept apart from choosing the best epoch; the temperature and the "
              "threshold are fitted on them")
    bias_report = optional_tools_module("bias_report", "Warning of shortcuts in the training data",
                                        "Training goes on without them.")
    if bias_report:  # the shortcut warnings of check-data, from file headers
        bias_report.print_shortcut_warnings(train_items, cfg.CROP_SIZE, cfg.DATA_SEED)
    if cfg.BATCH_SIZE == 1 and cfg.XI > 0:
        print("warning: BATCH_SIZE=1: SupCon needs two images of a class in a batch, so its term is always 0. "
              "Use --batch-size 2 or more (RINE: 128), or --xi 0 to train without it.")
    if cfg.BATCH_SIZE > len(train_items):
        print(f"warning: BATCH_SIZE={cfg.BATCH_SIZE} is larger than the {len(train_items)} training images: each epoch is "
              "one step on all of them. Lower --batch-size, or add images.")
    return train_items, val_items


# =====================================================================================
# Feature cache hook: tokens read from the cache (rine_plus_ssca_tools/feature_cache.py) or computed
# =====================================================================================

def tokens_from_cache_or_backbone(model, batch, pixels, cache):
    """CLS tokens for a batch: cached entries read, missing ones computed by the backbone and stored.

    Returns None without a cache (the model then runs its backbone itself).
    """
    if cache is None:
        return None
    cache.damaged += batch.n_damaged
    missing = ~batch.cached
    if not missing.any():
        return batch.tokens.to(pixels.device, non_blocking=True)
    computed, _ = model.backbone(pixels[missing.to(pixels.device)])
    cache.put(batch.indices[missing], batch.views[missing], batch.pixels[missing], computed.cpu())
    if batch.tokens is None:
        return computed
    tokens = batch.tokens.to(pixels.device, non_blocking=True)
    tokens[missing.to(pixels.device)] = computed
    return tokens


# =====================================================================================
# Demo data: generated 'photos' and 'generator' images, and a tiny backbone
# =====================================================================================

def _natural_image(rng, size):
    """A 'photo': 1/f^2 power spectrum (natural-image statistics), mixed colours, sensor noise."""
    frequency_y = np.fft.fftfreq(size)[:, None]
    frequency_x = np.fft.fftfreq(size)[None, :]
    radius = np.sqrt(frequency_x ** 2 + frequency_y ** 2)
    radius[0, 0] = 1.0 / size
    channels = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, (size, size))
        spectrum = (1.0 / radius ** rng.uniform(0.9, 1.1)) * np.exp(1j * phase)
        channels.append(np.real(np.fft.ifft2(spectrum)))
    image = np.stack(channels, axis=-1)
    image = image @ rng.uniform(0.2, 1.0, (3, 3))  # correlated colour channels, as in photos
    image = (image - image.mean()) / (image.std() + 1e-8)
    return image * rng.uniform(35, 60) + rng.uniform(90, 160, size=3)


def _upsample(image, method, rng):
    """2x upsampling as generators do it, each leaving its own periodic trace."""
    if method == "nearest":
        return image.repeat(2, axis=0).repeat(2, axis=1)
    if method == "bilinear":
        pil = [Image.fromarray(np.clip(image[..., c], 0, 255).astype(np.float32), mode="F") for c in range(3)]
        size = (image.shape[1] * 2, image.shape[0] * 2)
        return np.stack([np.asarray(p.resize(size, Image.BILINEAR)) for p in pil], axis=-1)
    # transposed convolution: zero insertion then a fixed 3x3 kernel -> checkerboard artefacts
    height, width, _ = image.shape
    zero_filled = np.zeros((height * 2, width * 2, 3))
    zero_filled[::2, ::2] = image * 4
    kernel = np.array([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]) * rng.uniform(0.8, 1.2)
    padded = np.pad(zero_filled, ((1, 1), (1, 1), (0, 0)), mode="reflect")
    out = np.zeros_like(zero_filled)
    for dy in range(3):
        for dx in range(3):
            out += kernel[dy, dx] * padded[dy:dy + height * 2, dx:dx + width * 2]
    return out / 4


def make_demo_image(rng, fake, method="bilinear", size=256):
    """uint8 [size,size,3]: real = full-resolution natural image; fake = half resolution, upsampled."""
    if not fake:
        image = _natural_image(rng, size) + rng.normal(0, 3.0, (size, size, 3))
    else:
        image = _upsample(_natural_image(rng, size // 2) + rng.normal(0, 3.0, (size // 2, size // 2, 3)), method, rng)
    return np.clip(image, 0, 255).astype(np.uint8)


DEMO_LAYOUT = {  # split -> generator folder -> images per class
    "train": {"nearest": 80, "bilinear": 80},
    "val": {"nearest": 30, "bilinear": 30},
    "test": {"nearest": 30, "bilinear": 30, "transposed_conv": 30},
}


def make_demo_dataset(root, seed=0):
    """Write data/demo/{train,val,test}/<generator>/{0_real,1_fake}/*.png once (a marker file says it's complete)."""
    root = Path(root)
    marker = root / ".complete"
    if marker.exists():
        return
    print(f"Generating the demo dataset in {root}/ ...")
    rng = np.random.default_rng(seed)
    for split, generators in DEMO_LAYOUT.items():
        for generator, count in generators.items():
            for label_folder, fake in (("0_real", False), ("1_fake", True)):
                folder = root / split / generator / label_folder
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    Image.fromarray(make_demo_image(rng, fake, generator)).save(folder / f"{i:04d}.png")
    marker.write_text("generated by rine_plus_ssca.py --demo\n")


def make_tiny_backbone(folder, seed=0):
    """A randomly initialised CLIP-architecture vision tower (4 blocks, width 64), saved like a real one."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              image_size=224, patch_size=32, projection_dim=64)
    CLIPVisionModel(config).save_pretrained(folder)
    return folder


# =====================================================================================
# Evaluation: metrics, calibration (a temperature for P(fake), its ECE), scoring
# =====================================================================================

def called_fake(probs, threshold, strict=False):
    """Which P(fake) are called fake: those at or above threshold; with strict (RINE's scoring, whose
    evaluation tests P(fake) > 0.5) those above it."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs > threshold if strict else probs >= threshold


def binary_metrics(labels, probs, threshold=0.5, strict=False):
    """Accuracy at threshold (strict: see called_fake), real/fake accuracy, best-threshold (oracle) accuracy,
    AP, ROC AUC and the binary ECE over P(fake) (bin_ece)."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    predicted_fake = called_fake(probs, threshold, strict)
    is_real, is_fake = labels == 0, labels == 1
    both_classes = is_real.any() and is_fake.any()
    best_acc = float("nan")
    if both_classes:
        # Accuracy at every ROC threshold: (TPR * n_fake + (1 - FPR) * n_real) / n.
        fpr, tpr, _ = roc_curve(labels, probs)
        best_acc = float(np.max(tpr * is_fake.sum() + (1 - fpr) * is_real.sum()) / len(labels))
    return {
        "n_real": int(is_real.sum()),
        "n_fake": int(is_fake.sum()),
        "acc": float((predicted_fake == is_fake).mean()) if len(labels) else float("nan"),
        "real_acc": float((~predicted_fake[is_real]).mean()) if is_real.any() else float("nan"),
        "fake_acc": float(predicted_fake[is_fake].mean()) if is_fake.any() else float("nan"),
        "best_acc": best_acc,
        "ap": float(average_precision_score(labels, probs)) if both_classes else float("nan"),
        "auc": float(roc_auc_score(labels, probs)) if both_classes else float("nan"),
        "bin_ece": expected_calibration_error(labels, probs),  # one class is enough: the fraction of fakes is 0 or 1
    }


def threshold_for_fpr(real_probs, target_fpr):
    """The lowest threshold calling at most target_fpr of these real images fake (rule: P >= t is fake)."""
    descending = np.sort(np.asarray(real_probs, dtype=np.float64))[::-1]
    allowed = int(math.floor(target_fpr * len(descending)))
    if allowed >= len(descending):
        return 0.0
    return float(np.nextafter(descending[allowed], np.inf))


def rates_at(labels, probs, threshold, strict=False):
    """(false-positive rate on the reals, recall on the fakes) when P(fake) >= threshold (strict: >) is called
    fake; NaN for a class that is absent."""
    labels, fake = np.asarray(labels), called_fake(probs, threshold, strict)
    return tuple(float(fake[labels == label].mean()) if (labels == label).any() else float("nan")
                 for label in (0, 1))


ECE_BINS = 15  # equal-width bins of P(fake) for the ECE and the reliability diagram (Guo et al. 2017 use 15)


def reliability_bins(labels, probs, n_bins=ECE_BINS):
    """Equal-width bins of P(fake) over [0, 1] (bin k holds [k/n, (k+1)/n), the last one also 1.0):
    (images per bin, mean P(fake) per bin, fraction of fakes per bin), NaN in empty bins."""
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    index = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 in empty bins: NaN
        mean_p = np.bincount(index, probs, minlength=n_bins) / counts
        fraction_fake = np.bincount(index, labels, minlength=n_bins) / counts
    return counts, mean_p, fraction_fake


def expected_calibration_error(labels, probs, n_bins=ECE_BINS):
    """Binary ECE over P(fake) (the bin_ece column): over equal-width bins of P(fake), the sum of (share of
    the images in the bin) x |fraction of fakes in the bin - mean P(fake) in the bin|. 0 means "P(fake) 0.9
    is 90% fakes" holds.

    Binned on P(fake) itself, not on the confidence max(P, 1 - P) of Guo et al. 2017's top-label ECE:
    for a detector the question is what P(fake) means, and the confidence version would put the
    images at P(fake) 0.1 and 0.9 in one bin, where a detector too quick to call fakes and one too
    quick to call reals can cancel out. NaN without images.
    """
    counts, mean_p, fraction_fake = reliability_bins(labels, probs, n_bins)
    filled = counts > 0
    if not filled.any():
        return float("nan")
    return float(np.sum(counts[filled] / counts.sum() * np.abs(fraction_fake[filled] - mean_p[filled])))


def top_label_calibration_error(labels, probs, n_bins=ECE_BINS):
    """The top-label ECE most papers report (Guo et al. 2017), beside the binary one: the confidence
    max(P, 1 - P) of the class called at 0.5 binned, against the share called right in each bin. It is the
    binary ECE's formula with "called right" as the label and the confidence as the probability."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=np.float64)
    called_right = (probs >= 0.5) == (labels == 1)
    return expected_calibration_error(called_right.astype(int), np.maximum(probs, 1 - probs), n_bins)


def probabilities_from_logits(logits, temperature=1.0, float32=False):
    """P(fake) = sigmoid(logit / temperature) in float64, so that a sharpening temperature (below 1) does not
    round P(fake) to exactly 0 or 1 as float32 does above |logit / T| ~ 17. Logits [B] -> [B]; logits
    [B, n_crops] -> sigmoid of the mean of the crops' logits, [B], as RINE averages ten crops (so a verdict
    at 0.5 does not depend on the temperature). float32=True computes in float32 as RINE's code does (its
    scores saturate to 1.0 above a logit of about 16.6); returned as float64 either way. Tensors or
    arrays; the same type back."""
    as_array = not isinstance(logits, torch.Tensor)
    logits = torch.as_tensor(logits)
    logits = logits.float() if float32 else logits.double()
    logits = logits.mean(dim=1) if logits.dim() == 2 else logits
    probs = torch.sigmoid(logits / temperature).double()
    return probs.numpy() if as_array else probs


TEMPERATURE_BOUNDS = (0.05, 20.0)  # the temperatures fit_temperature searches: sharpen up to 20x, flatten up to 20x


def platt_targets(labels):
    """Platt's (1999) smoothed targets: (N+ + 1) / (N+ + 2) for the N+ fakes, 1 / (N- + 2) for the N- reals,
    instead of 1 and 0. They say what N images can support: after N+ fakes all called right, the chance that
    the next one is called wrong is about 1 / (N+ + 2) (Laplace's rule of succession), not 0."""
    labels = np.asarray(labels, dtype=np.float64)
    n_fake, n_real = float(np.sum(labels == 1)), float(np.sum(labels == 0))
    return np.where(labels == 1, (n_fake + 1) / (n_fake + 2), 1 / (n_real + 2))


def fit_temperature(logits, labels, bounds=TEMPERATURE_BOUNDS, steps=60):
    """Temperature scaling (Guo et al. 2017) with Platt's smoothed targets: the T minimising the mean binary
    cross-entropy of sigmoid(logit / T) against platt_targets(labels). Returns (T, at_bound).

    Why the smoothed targets: against hard 0/1 targets, a validation set with no mistakes has no optimum
    (the NLL keeps falling as T -> 0), and one mistake among thousands of confident logits decides T on
    its own (4,000 logits with |z| in [4, 15] give T 0.05 with no mistake, 0.48 with one fake at -0.3).
    The smoothed targets cap how sure P(fake) may be by how many images vouch for it, so the optimum is
    finite with no mistake too, and each mistake moves T a little (0.898, 0.900, 0.901 for 0, 1, 2 mistakes
    in that example; tests/test_calibration.py).

    With beta = 1/T the loss, mean(softplus(beta z) - t beta z), is convex in beta (its second derivative
    mean(z^2 sigmoid'(beta z)) is >= 0), so its minimum is where the derivative mean(z (sigmoid(beta z) - t))
    changes sign: found by bisection on log(beta), deterministic. When the derivative keeps one sign
    over the whole range, the optimum lies beyond it, and the bound is returned with at_bound True
    (tiny logits in almost perfect order, or logits that tell nothing). Changing T never changes a verdict
    at 0.5, AP or AUC: only what P(fake) says.
    """
    z, targets = np.asarray(logits, dtype=np.float64), platt_targets(labels)
    if not np.any(z):  # no images, or every logit 0: every temperature gives the same P(fake)
        return 1.0, False

    def slope(log_beta):  # the sign of dNLL/dbeta, which dNLL/dlog(beta) shares
        return float(np.mean(z * (probabilities_from_logits(z * math.exp(log_beta)) - targets)))

    low, high = -math.log(bounds[1]), -math.log(bounds[0])  # log(beta) from the largest T to the smallest
    if slope(low) >= 0:
        return float(bounds[1]), True
    if slope(high) <= 0:
        return float(bounds[0]), True
    for _ in range(steps):  # 60 halvings of a range of 6: below float64 resolution
        middle = (low + high) / 2
        low, high = (low, middle) if slope(middle) > 0 else (middle, high)
    return math.exp(-(low + high) / 2), False


def temperature_bound_reason(temperature):
    """What a temperature at a bound of TEMPERATURE_BOUNDS says about the validation logits it was fitted on."""
    if temperature <= TEMPERATURE_BOUNDS[0]:
        return (f"lower bound {TEMPERATURE_BOUNDS[0]:g}: nearly every validation image was on the right side of "
                "P(fake) 0.5, so ever sharper P(fake) fit them better")
    return (f"upper bound {TEMPERATURE_BOUNDS[1]:g}: the validation logits barely told real from fake, so P(fake) is "
            "flattened towards 0.5")


def calibration_record(labels, logits, target_fpr=0.0):
    """What a best checkpoint stores under "calibration", from its validation labels and raw logits.

    temperature (fit_temperature, with at_bound), n_images, the validation binary ECE over P(fake) at T = 1
    and at the temperature, and separated: True when every validation image is on the right side of 0.5
    (the smoothed targets still give such a set a temperature of its own). With target_fpr > 0 also
    fpr_threshold, the lowest threshold calling at most that share of the validation reals fake on the
    calibrated P(fake), its twin fpr_threshold_raw on the raw P(fake) (each chosen on the values predict
    computes, so the bound holds exactly there), and what fpr_threshold gives on the validation images
    (val_fpr, val_fake_recall); None when target_fpr is 0.
    """
    labels, logits = np.asarray(labels).astype(int), np.asarray(logits, dtype=np.float64)
    temperature, at_bound = fit_temperature(logits, labels)
    separated = len(labels) > 0 and bool(np.all(np.where(labels == 1, logits, -logits) > 0))
    calibrated, raw = probabilities_from_logits(logits, temperature), probabilities_from_logits(logits)
    record = dict(temperature=temperature, n_images=len(labels), at_bound=at_bound, separated=separated,
                  val_ece_raw=expected_calibration_error(labels, raw),
                  val_ece_calibrated=expected_calibration_error(labels, calibrated),
                  target_fpr=None, fpr_threshold=None, fpr_threshold_raw=None, val_fpr=None, val_fake_recall=None)
    if target_fpr > 0:
        threshold = threshold_for_fpr(calibrated[labels == 0], target_fpr)
        val_fpr, val_fake_recall = rates_at(labels, calibrated, threshold)
        record.update(target_fpr=target_fpr, fpr_threshold=threshold, val_fpr=val_fpr, val_fake_recall=val_fake_recall,
                      fpr_threshold_raw=threshold_for_fpr(raw[labels == 0], target_fpr))
    return record


def model_logits(model, pixels, cls_tokens=None):
    """Raw logits in float32: [B] for pixels [B,3,H,W], [B,n_crops] for [B,n_crops,3,H,W] (TenCrop)."""
    if pixels.dim() == 5:
        batch, crops = pixels.shape[:2]
        logits, _ = model(pixels.flatten(0, 1))
        return logits.float().view(batch, crops)
    logits, _ = model(pixels, cls_tokens)
    return logits.float()


def model_probabilities(model, pixels, cls_tokens=None):
    """P(fake) [B] as float64 at the model's temperature (1 unless load_detector set a calibrated one);
    for [B,n_crops,3,H,W] (TenCrop) the sigmoid of the mean of the crops' logits. Under RINE's scoring
    (scores_as_rine) the sigmoid runs in float32, as RINE's does."""
    return probabilities_from_logits(model_logits(model, pixels, cls_tokens), model.temperature,
                                     float32=scores_as_rine(model.config))


@torch.inference_mode()
def score_loader(model, loader, device, amp_dtype, cache=None):
    """Run the model over a loader: (indices, labels, P(fake), raw logits, summed BCE, bad) with bad = [(index,
    error)]. P(fake) is at the model's temperature; the logits are [N], or [N, 10] for ten crops, so that
    probabilities_from_logits(logits, T, float32=scores_as_rine(model.config)) gives P(fake) at any temperature
    T exactly."""
    model.eval()
    all_indices, all_labels, all_probs, all_logits = [], [], [], []
    bce_total, all_bad = torch.zeros((), dtype=torch.float64, device=device), []
    for batch in loader:
        all_bad += batch.bad
        if batch.pixels is None:
            continue
        pixels = normalise_uint8(batch.pixels.to(device, non_blocking=True))
        labels, indices = batch.labels.to(device, non_blocking=True), batch.indices
        with head_autocast(device, amp_dtype):
            tokens = tokens_from_cache_or_backbone(model, batch, pixels, cache)
            logits = model_logits(model, pixels, tokens)
        probs = probabilities_from_logits(logits, model.temperature, float32=scores_as_rine(model.config))
        bce_total += F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), labels.double(), reduction="sum")
        all_indices.append(indices)
        all_labels.append(labels.cpu())
        all_probs.append(probs.cpu())
        all_logits.append(logits.cpu())
    if not all_probs:
        return np.zeros(0, int), np.zeros(0), np.zeros(0), np.zeros(0, np.float32), 0.0, all_bad
    return (torch.cat(all_indices).numpy(), torch.cat(all_labels).numpy(), torch.cat(all_probs).numpy(),
            torch.cat(all_logits).numpy(), float(bce_total.item()), all_bad)


def format_table(columns, rows):
    """Plain-text table; floats with 4 decimals."""
    text_rows = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(str(c))] + [len(r[i]) for r in text_rows]) for i, c in enumerate(columns)]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in text_rows:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def format_markdown_table(columns, rows):
    """The same table as format_table, as Markdown."""
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value):
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


METRIC_COLUMNS = ["n_real", "n_fake", "acc", "real_acc", "fake_acc", "best_acc", "ap", "auc", "bin_ece", "skipped"]
SPLIT_FOLDER_NAMES = {"train", "val", "test"}


def generator_row_names(labels_per_group, root_name):
    """The table row of each group, named as the papers name the generator.

    labels_per_group: {group: set of labels found in it}, groups as scan_image_folder gives them.
    A trailing split folder is dropped (GenImage: `sdv1.4/val` -> `sdv1.4`; tree_items refuses
    training splits before). A folder whose image folders each hold both classes is one generator
    with categories (ForenSynths: `progan/car`, `progan/cat` -> `progan`). So is one where a few
    of them hold one class, all the same one, as long as more hold both: a category missing a
    class (a partial download) does not split its generator into per-category rows. Otherwise the
    folder collects generators, each sub-folder looked at on its own (UniversalFakeDetect:
    `diffusion_datasets/guided` is a row of its own; `gans/biggan` with both classes beside
    `gans/stargan` with fakes only are two rows). Images right under the test folder (`real/`,
    `fake/`) make a row named after it.
    """
    def without_split(group):
        parts = [] if group == "." else group.split("/")
        while len(parts) > 1 and parts[-1].lower() in SPLIT_FOLDER_NAMES:
            parts.pop()
        return tuple(parts)

    labels_at = {}
    for group, labels in labels_per_group.items():
        labels_at.setdefault(without_split(group), set()).update(labels)

    def row_name(parts):
        for depth in range(1, len(parts) + 1):  # the shortest folder path that is one generator
            below = [other for other in labels_at if other[:depth] == parts[:depth]]
            if len(below) == 1 or all(len(labels_at[other]) == 2 for other in below):
                return "/".join(parts[:depth])
            one_class = [labels_at[other] for other in below if len(labels_at[other]) == 1]
            if len(one_class) < len(below) - len(one_class) and len(set.union(*one_class)) == 1:
                return "/".join(parts[:depth])  # categories of one generator, a few missing the same class
        return "/".join(parts) or root_name

    return {group: row_name(without_split(group)) for group in labels_per_group}


def per_generator_rows(items, labels, probs, threshold, skipped_per_generator=None, order=None, strict=False):
    """One metrics row per generator (item[2]) in `order` (default: by name), plus the mean row.

    A row holding one class only is named '<generator> (fakes only)' or '(reals only)': its acc
    is the share called right, its ECE how far its mean P(fake) is from 1 (or 0), it has no AP/AUC,
    and it stays out of the mean. The mean row averages the metrics of the other rows, as papers do,
    says how many ('mean (20 generators)') and sums their counts. Without a row holding both classes
    there is no mean row. strict: an image is fake when P(fake) > threshold (RINE's scoring), not >=.
    """
    skipped_per_generator = skipped_per_generator or {}
    generators = np.array([item[2] for item in items], dtype=object)
    names = sorted({item[2] for item in items} | set(skipped_per_generator)) if order is None else order
    rows, averaged = [], []
    for generator in names:
        chosen = generators == generator
        metrics = binary_metrics(labels[chosen], probs[chosen], threshold, strict)
        metrics["skipped"] = skipped_per_generator.get(generator, 0)
        row = [generator] + [metrics[c] for c in METRIC_COLUMNS]
        if metrics["n_real"] and metrics["n_fake"]:
            averaged.append(row)
        elif metrics["n_real"] or metrics["n_fake"]:
            row[0] += " (reals only)" if metrics["n_real"] else " (fakes only)"
        rows.append(row)
    if averaged:
        counts = [sum(r[i] for r in averaged) for i in (1, 2)]
        means = [float(np.mean([r[i] for r in averaged])) for i in range(3, len(METRIC_COLUMNS))]
        name = f"mean ({len(averaged)} generator{'s' if len(averaged) > 1 else ''})"
        rows.append([name] + counts + means + [sum(r[-1] for r in averaged)])
    return rows


def mean_row_of(rows):
    """The mean row of a per_generator_rows table, or None when no row holds both classes."""
    return rows[-1] if rows and rows[-1][0].startswith("mean (") else None


def one_class_note(rows):
    """What to tell a user whose table has rows of one class only, or None."""
    lonely = [row[0] for row in rows if row[0].endswith(" only)")]
    if not lonely:
        return None
    subject = "1 row holds" if len(lonely) == 1 else f"{len(lonely)} rows hold"
    mean = "no row has both, so there is no mean row" if mean_row_of(rows) is None else "left out of the mean"
    return (f"{subject} one class only ({mean}): {', '.join(lonely)}. "
            "Their acc is the share called right; AP and AUC need both classes. Pair real images with "
            "--real-dir DIR (one real folder for every row without reals) or --protocol FILE (real folders per row, "
            "e.g. protocols/rine20.json).")


def training_split_folder(groups):
    """The first training split among the folders of these groups (scan_image_folder's), or None.

    A folder named `train` is a split when every folder beside it is named train, val or test
    (GenImage: `sdv1.4/train` beside `sdv1.4/val`; a dataset root holding `train/` and `test/`).
    ForenSynths' category `progan/train` (the vehicle) sits beside `progan/car` and is none.
    """
    children = {}
    for group in groups:
        parts = () if group == "." else tuple(group.split("/"))
        for depth in range(len(parts)):
            children.setdefault(parts[:depth], set()).add(parts[depth])
    for parent, names in sorted(children.items()):
        if {name.lower() for name in names} <= SPLIT_FOLDER_NAMES:
            for name in sorted(names):
                if name.lower() == "train":
                    return "/".join(parent + (name,))
    return None


def tree_items(data_dir, real_dir=None):
    """Items of every labelled image under data_dir, rows named by generator_row_names, sorted by row."""
    found, unlabeled = scan_image_folder(data_dir)
    real_paths = None
    if real_dir is not None:
        real_dir = Path(real_dir)
        if not real_dir.is_dir():
            raise UserError(f"No folder {real_dir} for --real-dir; give the folder of real images shared by the fake-only generators.")
        labelled_reals, unlabeled_reals = scan_image_folder(real_dir)
        real_paths = [path for path, label, _ in labelled_reals if label == 0] + unlabeled_reals
        inside = os.path.abspath(real_dir) + os.sep
        found = [item for item in found if not os.path.abspath(item[0]).startswith(inside)]
        unlabeled = [path for path in unlabeled if not os.path.abspath(path).startswith(inside)]
        if unlabeled:  # Synthbuster: <generator>/*.png are all fakes, the reals are elsewhere
            print(f"note: {len(unlabeled)} images under {data_dir} are in no real/fake folder and are taken as fakes "
                  f"(the reals are in --real-dir), e.g. {unlabeled[0]}")
            found += [(path, 1, Path(path).parent.relative_to(data_dir).as_posix()) for path in unlabeled]
    elif unlabeled:
        print(f"note: {len(unlabeled)} images under {data_dir} are in no real/fake folder and are ignored, e.g. {unlabeled[0]}")
    labels_per_group = {}
    for _, label, group in found:
        labels_per_group.setdefault(group, set()).add(label)
    training = training_split_folder(labels_per_group)
    if training is not None:  # its images would enter the test rows (GenImage's root holds <gen>/train beside <gen>/val)
        raise UserError(f"{Path(data_dir) / training} is a training split, and eval scores test images only; give --data "
                        "the val or test folder (or the train folder itself to score it on purpose), or for GenImage "
                        "--protocol protocols/genimage.json, which reads the val folders.")
    row_of = generator_row_names(labels_per_group, Path(data_dir).resolve().name)
    by_row = {}
    for path, label, group in found:
        by_row.setdefault(row_of[group], []).append((path, label, row_of[group]))
    if real_paths is not None:
        for row, members in by_row.items():
            if not any(label == 0 for _, label, _ in members):
                members += [(path, 0, row) for path in real_paths]
    return [item for row in sorted(by_row) for item in by_row[row]]


def collect_test_items(data_dir, real_dir=None, max_per_class=None, seed=0, protocol=None):
    """Labelled (path, label, row name) items under data_dir, in the order of the table's rows.

    Without a protocol, each generator found in the tree is a row (generator_row_names).
    real_dir: the simple case of one folder of real images for every row that has none of its
    own; images under data_dir in no label folder are then taken as fakes (Synthbuster's
    `<generator>/*.png`). protocol: a protocol file naming each row's folders, e.g. protocols/rine20.json
    (read by rine_plus_ssca_tools/protocols.py). max_per_class: a seeded sample of at most N per class and row.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"No folder {data_dir}; give --data a folder holding <generator>/0_real|1_fake (or real|fake, nature|ai).")
    if protocol is not None:
        protocols = tools_module("protocols", "eval --protocol")
        items = protocols.protocol_items(data_dir, protocols.read_protocol(protocol), real_dir, source=str(protocol))
        if not items:
            raise UserError(f"None of the folders named by {protocol} holds images under {data_dir}; "
                            "give --data the folder its paths start from (e.g. data/test for protocols/rine20.json).")
    else:
        items = tree_items(data_dir, real_dir)
    if max_per_class:
        rng = random.Random(seed)
        position = {row: index for index, row in enumerate(dict.fromkeys(item[2] for item in items))}
        sampled = []
        for key in sorted({(g, label) for _, label, g in items}):
            members = [item for item in items if (item[2], item[1]) == key]
            sampled += members if len(members) <= max_per_class else rng.sample(members, max_per_class)
        items = sorted(sampled, key=lambda item: position[item[2]])
    if not items:
        raise UserError(f"No labelled images under {data_dir}; labels come from folders named 0_real/real/nature and "
                        "1_fake/fake/ai. To score images without labels, use predict: python rine_plus_ssca.py predict "
                        f"--ckpt CHECKPOINT {data_dir}")
    return items


def score_items(model, items, batch_size=64, num_workers=4, tencrop=False, jpeg_quality=None, blur_sigma=None,
                resize=None):
    """P(fake) and the raw logits for each distinct path in items: (dict path -> P(fake), dict path -> logit (the
    ten crops' logits with tencrop), list of unreadable paths)."""
    device = next(model.parameters()).device
    cfg = SimpleNamespace(**model.config)
    cfg.BATCH_SIZE, cfg.NUM_WORKERS = batch_size, num_workers
    unique_paths = sorted({item[0] for item in items})
    transform = build_transform(cfg, False, jpeg_quality, blur_sigma, tencrop, resize)
    loader = make_loader([(path, 0, "") for path in unique_paths], cfg, train=False, device=device, transform=transform)
    indices, _, probs, logits, _, bad = score_loader(model, loader, device, head_amp_dtype(cfg, device))
    for index, error in bad:
        print(f"warning: skipped unreadable image {unique_paths[index]} ({error})", file=sys.stderr)
    scores = {unique_paths[i]: float(p) for i, p in zip(indices, probs)}
    logit_of = {unique_paths[i]: z for i, z in zip(indices, logits)}
    return scores, logit_of, [path for path in unique_paths if path not in scores]


def evaluate_items(model, items, batch_size=64, num_workers=4, threshold=None, tencrop=False, jpeg_quality=None,
                   blur_sigma=None, resize=None):
    """Score collect_test_items' items and tabulate them: (table rows, scored items, labels, P(fake), raw logits
    ([N], or [N, 10] with tencrop)).

    Unreadable images are counted per row in the 'skipped' column and left out of the rest.
    """
    threshold = model.config["THRESHOLD"] if threshold is None else threshold
    scores, logit_of, unreadable = score_items(model, items, batch_size, num_workers, tencrop, jpeg_quality,
                                               blur_sigma, resize)
    unreadable = set(unreadable)
    skipped = {}
    for path, _, generator in items:
        if path in unreadable:
            skipped[generator] = skipped.get(generator, 0) + 1
    kept = [item for item in items if item[0] in scores]
    labels = np.array([item[1] for item in kept], dtype=np.int64)
    probs = np.array([scores[item[0]] for item in kept], dtype=np.float64)
    logits = np.array([logit_of[item[0]] for item in kept], dtype=np.float64)
    if unreadable:
        print(f"warning: {len(unreadable)} unreadable images were skipped, e.g. {sorted(unreadable)[0]}")
    order = list(dict.fromkeys(item[2] for item in items))
    rows = per_generator_rows(kept, labels, probs, threshold, skipped, order, strict=scores_as_rine(model.config))
    return rows, kept, labels, probs, logits


def evaluate_folder(model, data_dir, batch_size=64, num_workers=4, threshold=None, real_dir=None,
                    max_per_class=None, tencrop=False, jpeg_quality=None, blur_sigma=None, seed=0,
                    protocol=None, resize=None):
    """Score every labelled image under data_dir (or a protocol's rows); returns evaluate_items' (table rows,
    items, labels, P(fake), raw logits)."""
    items = collect_test_items(data_dir, real_dir, max_per_class, seed, protocol)
    return evaluate_items(model, items, batch_size, num_workers, threshold, tencrop, jpeg_quality, blur_sigma, resize)


# =====================================================================================
# Checkpoints: small, plain, loadable with weights_only=True
# =====================================================================================

def make_checkpoint(model, epoch, metrics, history, calibration=None, config=None):
    """The model's architecture and trainable weights, the run's settings (`config`, a namespace of every
    constant: the training run's; by default the model's own settings), metrics, versions and (best
    checkpoints) the calibration_record: tensors and plain Python values only."""
    config = model.config if config is None else {name: getattr(config, name) for name in CONFIG_NAMES}
    return checkpoint_record(config, model.backbone.backbone_config, model.trainable_state_dict(),
                             epoch, metrics, history, calibration)


def checkpoint_record(config, backbone_config, state, epoch, metrics, history, calibration=None):
    """The checkpoint dict, from a model's parts (training) or from imported weights (import-rine); `config`
    is a dict of the constants. Without a calibration (last and imported checkpoints) there is no
    "calibration" entry."""
    import transformers
    import torchvision

    return {
        "format": CHECKPOINT_FORMAT,
        # What load_detector builds the model from, apart from how it was trained (whose SCORING constants
        # say how it scores).
        "architecture": plain_values({name: config[name] for name in ARCHITECTURE_CONSTANTS}),
        "run_config": plain_values({name: config[name] for name in config if name not in ARCHITECTURE_CONSTANTS}),
        "backbone_config": plain_values(backbone_config),
        "model": state,
        # The architecture holds CLIP_MODEL as given (often relative to the training run's folder); this absolute
        # path lets a notebook in any other folder find the same backbone folder.
        "backbone_folder": backbone_folder_of(config["CLIP_MODEL"]),
        "epoch": epoch,
        "metrics": plain_values(metrics),
        "history": plain_values(history),
        "versions": plain_values({"torch": torch.__version__, "torchvision": torchvision.__version__,
                                  "transformers": transformers.__version__}),
        **provenance(),
        **({"calibration": plain_values(calibration)} if calibration is not None else {}),
    }


def checkpoint_config(checkpoint):
    """Every constant a checkpoint records (as read_checkpoint returns it): architecture and run settings in one dict."""
    return {**checkpoint["run_config"], **checkpoint["architecture"]}


def model_settings(checkpoint):
    """What load_detector builds a model from: the checkpoint's architecture and SCORING constants. A constant
    the checkpoint predates has its default (how the script behaved before the constant existed)."""
    stored = checkpoint_config(checkpoint)
    return {name: stored.get(name, CONSTANTS[name].default) for name in ARCHITECTURE_CONSTANTS + SCORING_CONSTANTS}


# The code that decides a detector's scores: the modules, the model, the test crops and the sigmoid.
# A checkpoint records a hash of its source, so an edited message or option leaves it unchanged.
MODEL_CODE = ("FrozenCLIPBlocks", "projection_mlp", "importance_weighted_sum", "rine_head", "dct_matrix", "BlockDCT",
              "DCTConvBlock", "SSCA", "OneQueryAttention", "CrossAttentionCombination",
              "GatedMLP", "RINEPlusSSCA", "build_transform", "CentreCrop", "TenCrops", "ZeroPadToAtLeast",
              "StackCrops", "PadToAtLeast", "to_uint8_tensor", "normalise_uint8", "load_rgb", "model_logits",
              "probabilities_from_logits", "called_fake")


def provenance():
    """What made the weights: {"model_code_sha256": ..., "git_commit": ...} (each worked out once per process)."""
    return {"model_code_sha256": model_code_sha256(), "git_commit": git_commit()}


@functools.lru_cache(maxsize=None)
def model_code_sha256():
    """SHA-256 of the source of MODEL_CODE's definitions, in its order; None when the file can't be read."""
    import ast

    try:
        source = Path(__file__).read_text(encoding="utf-8")
    except OSError:
        return None
    lines = source.splitlines(keepends=True)
    spans = {node.name: "".join(lines[node.lineno - 1:node.end_lineno]) for node in ast.parse(source).body
             if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    return hashlib.sha256("".join(spans[name] for name in MODEL_CODE).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def git_commit():
    """The commit of the git checkout this script sits in, with "+changes" when the script differs from it;
    None outside a checkout or without git."""
    import subprocess

    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        changed = subprocess.run(["git", "status", "--porcelain", "--", Path(__file__).name], cwd=folder,
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return commit.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def backbone_folder_of(clip_model):
    """The absolute path of a local backbone folder; None for a HuggingFace id."""
    folder = Path(clip_model).expanduser()
    return str(folder.resolve()) if folder.is_dir() else None


def plain_values(value):
    """Builtin dict/list/str/int/float/bool/None only, which torch.load(weights_only=True) accepts.

    Subclasses (torch's version string, NumPy scalars) become their builtin type; anything
    else (a dtype in a HuggingFace config, say) is dropped.
    """
    if isinstance(value, dict):
        kept = {str(k): plain_values(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _DROPPED}
    if isinstance(value, (list, tuple)):
        return [v for v in (plain_values(v) for v in value) if v is not _DROPPED]
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return _DROPPED


_DROPPED = object()


def read_checkpoint(path):
    """A checkpoint (.pth) or an exported .safetensors file as a dict, never unpickling code; friendly errors."""
    path = Path(path)
    if path.is_dir():
        found = sorted(str(p) for p in path.iterdir() if p.suffix in (".pth", ".safetensors"))
        raise UserError(f"{path} is a folder; name one checkpoint file in it (--ckpt FILE, or load_detector(FILE) in "
                        "Python): "
                        + (", ".join(found) if found else "it holds no .pth or .safetensors files") + ".")
    if not path.is_file():
        raise UserError(f"No checkpoint at {path}; train first (python rine_plus_ssca.py), or give the right path "
                        "(--ckpt FILE, or load_detector(FILE) in Python).")
    with open(path, "rb") as f:
        header = f.read(9)
    if header[8:9] == b"{":  # safetensors: an 8-byte length, then a JSON header
        checkpoint = tools_module("rine_format", "Loading an exported .safetensors file").read_exported(path)
    else:
        checkpoint = read_torch_checkpoint(path)
    if isinstance(checkpoint, dict) and "alpha" in checkpoint and any(key.startswith("proj1.") for key in checkpoint):
        raise UserError(f"{path} holds RINE's own weights (alpha, proj1, ...), not a checkpoint of this script; turn it "
                        f"into one first: python rine_plus_ssca.py import-rine --ckpt {path} --out checkpoints/rine.pth")
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or not {"architecture", "config"} & checkpoint.keys():
        raise UserError(f"{path} is not a rine_plus_ssca checkpoint (no 'model'/'architecture' entries).")
    if checkpoint.get("format") not in READABLE_FORMATS:
        raise UserError(f"{path} has checkpoint format {checkpoint.get('format')!r}; this script reads formats "
                        f"{', '.join(map(str, READABLE_FORMATS))}. Use the script version that wrote it.")
    if "config" in checkpoint:  # format 3, or an exported file: every constant in one dict
        config = checkpoint.pop("config")
        checkpoint["architecture"] = {name: value for name, value in config.items() if name in ARCHITECTURE_CONSTANTS}
        checkpoint["run_config"] = {name: value for name, value in config.items() if name not in ARCHITECTURE_CONSTANTS}
    return checkpoint


def read_torch_checkpoint(path):
    """torch.load with weights_only=True: tensors and plain values only."""
    try:
        with warnings.catch_warnings():  # a refused file is reported in one line below, not with torch's warnings
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"Refused {path}: loading it would need pickle, which can run arbitrary code. Only checkpoints "
                        "written by rine_plus_ssca.py (tensors and plain values) are loaded.") from error
    except Exception as error:
        raise UserError(f"{path} is not a checkpoint this script can load safely ({type(error).__name__}); "
                        "only files written by rine_plus_ssca.py are accepted.") from error


def resolve_backbone_location(clip_model, checkpoint_path, backbone_folder=None):
    """Where the checkpoint's backbone folder is now: as given (relative to this folder), where training
    found it (backbone_folder, absolute), or next to the checkpoint. A HuggingFace id is returned as it is."""
    candidates = [Path(clip_model).expanduser()]
    if backbone_folder:
        candidates.append(Path(backbone_folder))
    if checkpoint_path is not None:
        candidates.append(Path(checkpoint_path).parent / Path(clip_model).name)
    for folder in candidates:
        if folder.is_dir():
            return str(folder)
    if backbone_folder:
        raise UserError(f"The backbone folder {clip_model} this detector was trained with is not in {Path.cwd()}, at "
                        f"{backbone_folder}, or next to {checkpoint_path}. Pass where it is now: --clip-model FOLDER, "
                        "or load_detector(path, clip_model=FOLDER) in Python.")
    return clip_model


def load_detector(path, clip_model=None, device=None, calibrated=True):
    """Rebuild the model from a checkpoint (.pth) or an exported .safetensors file; returns it in eval mode
    on `device` (default: GPU if any).

    clip_model overrides where the backbone is loaded from (e.g. a local copy of ViT-L/14).
    model.calibration is the checkpoint's calibration_record (None when it has none: a last or imported
    checkpoint, or one from before calibration); model.temperature its temperature, so predict gives the
    calibrated P(fake), or 1 (the raw P(fake), sigmoid(logit)) with calibrated=False or without one.
    """
    checkpoint = read_checkpoint(path)
    cfg = SimpleNamespace(**model_settings(checkpoint), DROPOUT=DROPOUT)  # eval mode: the dropout rate plays no part
    cfg.CLIP_MODEL = clip_model or resolve_backbone_location(cfg.CLIP_MODEL, path, checkpoint.get("backbone_folder"))
    device = resolve_device(device or "auto")
    model = build_model(cfg, device)
    check_backbone_matches(checkpoint.get("backbone_config", {}), model.backbone.backbone_config, path, cfg.CLIP_MODEL)
    load_trainable_weights(model, checkpoint["model"], path)
    model.checkpoint_metrics = checkpoint.get("metrics", {})
    model.calibration = checkpoint.get("calibration")
    model.temperature = model.calibration["temperature"] if calibrated and model.calibration else 1.0
    return model.eval()


def load_trainable_weights(model, state, path):
    """Load a checkpoint's trainable weights into model, refusing a missing or unexpected key: the frozen
    backbone's weights are the only ones a checkpoint leaves out."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensor shapes differ: another architecture
        raise UserError(f"{path} does not match this model ({str(error).strip().splitlines()[-1].strip()[:160]}); "
                        "it was written by another architecture or script version.") from error
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise UserError(f"{path} does not match this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        "it was written by another architecture or script version.")


def stored_threshold(model):
    """The checkpoint's TARGET_FPR threshold on the scale of the P(fake) the model gives now (calibrated, or
    raw at temperature 1), or None (no such threshold, or a temperature set by hand)."""
    calibration = model.calibration
    if not calibration or calibration.get("fpr_threshold") is None:
        return None
    if model.temperature == calibration["temperature"]:  # also right when the fit gave 1: both scales are one
        return calibration["fpr_threshold"]
    return calibration["fpr_threshold_raw"] if model.temperature == 1.0 else None


def decision_threshold(model, threshold=None):
    """(threshold, note) for calling images fake: `threshold` when given; else the threshold the checkpoint
    stores for TARGET_FPR (chosen on validation reals, never on test images), with a note saying so;
    else THRESHOLD. The note is None unless the threshold is the stored one."""
    stored = stored_threshold(model) if threshold is None else None
    if stored is None:
        return (model.config["THRESHOLD"] if threshold is None else threshold), None
    target = model.calibration["target_fpr"]
    return stored, f"threshold {stored:.4g}: at most {target * 100:g}% of validation reals called fake (TARGET_FPR {target:g})"


def describe_probabilities(model):
    """One line saying what P(fake) is here: calibrated (the temperature), raw on request, or uncalibrated."""
    calibration = model.calibration
    if not calibration:
        return ("P(fake) is uncalibrated, sigmoid(logit): the checkpoint stores no temperature (an imported or a last "
                "checkpoint, or one from before calibration)")
    fitted = f"{calibration['temperature']:.3g} fitted on {calibration['n_images']} validation images"
    if calibration.get("separated") and model.temperature == 1.0:
        return (f"P(fake) is sigmoid(logit), temperature 1: the {calibration['n_images']} validation images were all on "
                "the right side of 0.5, which cannot fix a temperature")
    if model.temperature != calibration["temperature"]:
        shown = "raw, sigmoid(logit)" if model.temperature == 1.0 else f"sigmoid(logit / {model.temperature:g})"
        return f"P(fake) is {shown}, not calibrated (the checkpoint's temperature is {fitted})"
    bound = f" (at its {temperature_bound_reason(calibration['temperature'])})" if calibration["at_bound"] else ""
    return f"P(fake) is calibrated, sigmoid(logit / T) with the temperature T = {fitted}{bound}"


def check_backbone_matches(expected, actual, path, clip_model):
    """The backbone must have the width and number of blocks the checkpoint was made with (a clear UserError)."""
    want = (expected.get("hidden_size"), expected.get("num_hidden_layers"))
    have = (actual.get("hidden_size"), actual.get("num_hidden_layers"))
    if None not in want and want != have:
        raise UserError(f"{path} was made for a backbone of width {want[0]} with {want[1]} blocks, but {clip_model} "
                        f"has width {have[0]} with {have[1]} blocks; name the backbone it was made with (--clip-model, or "
                        "load_detector(..., clip_model=...) in Python; RINE's checkpoints: openai/clip-vit-large-patch14).")


@torch.inference_mode()
def predict(model, images, batch_size=32, tencrop=False):
    """P(fake) per image as a NumPy array [N] (float64). images: a path, a PIL image, or a list of them.

    Any size and mode: smaller images are padded, larger ones centre-cropped (or, with tencrop=True,
    scored on ten crops: the sigmoid of the mean of their logits, as RINE does). P(fake) is calibrated,
    sigmoid(logit / model.temperature), when load_detector found a calibration (describe_probabilities(model) says which);
    decision_threshold(model) gives the threshold to call an image fake.
    """
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    cfg = SimpleNamespace(**model.config)
    transform = build_transform(cfg, train=False, tencrop=tencrop)
    device = next(model.parameters()).device
    amp_dtype = head_amp_dtype(cfg, device)
    model.eval()
    probabilities = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([transform(load_rgb(image)) for image in images[start:start + batch_size]])
        pixels = normalise_uint8(pixels.to(device))
        with head_autocast(device, amp_dtype):
            probabilities.append(model_probabilities(model, pixels).cpu())
    return torch.cat(probabilities).numpy() if probabilities else np.zeros(0)


# =====================================================================================
# Training
# =====================================================================================

def build_model(cfg, device, **backbone_options):
    """The detector on `device`, its frozen backbone cast once to the mixed-precision dtype, with speed_settings."""
    backbone_dtype = resolve_amp_dtype(cfg.AMP, device, rine_scoring=scores_as_rine(cfg))
    return speed_settings(RINEPlusSSCA(cfg, backbone_dtype, **backbone_options).to(device))


def speed_settings(model):
    """The device-specific speed choices, kept apart from the modules' definitions; returns the model.

    On the CPU each DCTConvBlock runs channels-last (measured: oneDNN's depthwise-convolution backward
    is about 4x faster so) and hands NCHW tensors back to the BatchNorms around it, whose backward is
    about 2.5x slower on channels-last ones. Results are the same; on GPUs nothing changes.
    """
    for module in model.modules():
        if isinstance(module, DCTConvBlock):
            module.register_forward_pre_hook(_channels_last_on_cpu)
            module.pointwise.register_forward_hook(_back_to_nchw)
    return model


def _channels_last_on_cpu(block, inputs):
    (x,) = inputs
    if x.device.type != "cpu":
        return None
    if x.requires_grad:  # the gradient flowing back to the BatchNorm before the block: NCHW again
        x.register_hook(lambda grad: grad.contiguous())
    return (x.contiguous(memory_format=torch.channels_last),)


def _back_to_nchw(pointwise, inputs, output):
    return output.contiguous()  # for the block's own BatchNorm (a no-op on NCHW tensors)


def make_optimizer(model, cfg):
    """Adam over the head. fused=True updates all tensors in one kernel (3-4x faster than the loop on a CPU)."""
    return torch.optim.Adam(model.trainable_parameters(), lr=cfg.LR, weight_decay=cfg.WEIGHT_DECAY, fused=True)


def lr_drop_epochs(spec):
    """LR_DROP_EPOCHS "6,11" -> [6, 11] (1-based epochs); "" -> []."""
    try:
        epochs = sorted(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        epochs = [0]
    if epochs and epochs[0] < 1:
        raise UserError(f"LR_DROP_EPOCHS={spec!r} must list epochs from 1 up, e.g. '6,11' (or '' for a constant LR).")
    return epochs


def learning_rate(cfg, epoch):
    """The LR of `epoch` (1-based): LR divided by 10 for each listed LR_DROP_EPOCHS epoch up to this one,
    as RINE's epochs_reduce_lr (with "6,11": LR in epochs 1-5, LR/10 in 6-10, LR/100 from 11)."""
    return cfg.LR / 10 ** sum(1 for drop in lr_drop_epochs(cfg.LR_DROP_EPOCHS) if drop <= epoch)


def validate_config(cfg):
    """Refuse impossible constant values with a one-line UserError before anything is loaded."""
    for name, constant in CONSTANTS.items():
        problem = constant_problem(constant, getattr(cfg, name))
        if problem:
            raise UserError(f"{name}={getattr(cfg, name)!r} {problem}. {name}: {constant.help}.")
    if cfg.FUSION_DIM % cfg.FUSION_HEADS:
        raise UserError(f"FUSION_HEADS={cfg.FUSION_HEADS} must divide FUSION_DIM={cfg.FUSION_DIM}.")
    lr_drop_epochs(cfg.LR_DROP_EPOCHS)


def constant_problem(constant, value):
    """What is wrong with `value` for a declared constant ("" when nothing)."""
    if constant.choices and value not in constant.choices:
        return f"is not one of {', '.join(map(str, constant.choices))}"
    limits = [(constant.at_least, "at least", lambda bound: value >= bound),
              (constant.above, "above", lambda bound: value > bound),
              (constant.at_most, "at most", lambda bound: value <= bound),
              (constant.below, "below", lambda bound: value < bound)]
    limits = [(bound, words, holds) for bound, words, holds in limits if bound is not None]
    if not all(holds(bound) for bound, _, holds in limits):
        return "must be " + " and ".join(f"{words} {bound:g}" for bound, words, _ in limits)
    if constant.multiple_of and value % constant.multiple_of:
        return f"must be a multiple of {constant.multiple_of}"
    return ""


def print_block_importance(model, top=5):
    """Print the `top` CLIP blocks by TIE importance (RINE's finding: intermediate blocks matter)."""
    weights = model.block_importance()
    order = torch.argsort(weights, descending=True)[:top]
    ranked = ", ".join(f"block {model.backbone.blocks[i]}: {weights[i]:.3f}" for i in order.tolist())
    print(f"TIE block importance (top {min(top, len(weights))}): {ranked}")


def is_better(metric_name, metrics, best):
    """Is this epoch better than `best` (the best epoch's metrics)? Ties go to the lower validation loss."""
    key = "val_bce" if metric_name == "loss" else metric_name
    value = metrics[key]
    if best is None or math.isnan(best[key]):
        return not math.isnan(value)
    if value == best[key]:
        return metrics["val_bce"] < best["val_bce"]
    return value < best[key] if metric_name == "loss" else value > best[key]


def configure_determinism(deterministic):
    """Deterministic kernels when asked (bit-identical CPU runs); fast TF32 matmuls otherwise."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs this to be deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def save_last(path, learner, progress, config):
    """The last checkpoint: the model (with the run's `config`) plus everything needed to resume at `progress`."""
    history = progress.history
    checkpoint = make_checkpoint(learner.model, progress.epoch, history[-1] if history else {}, history, config=config)
    checkpoint["resume"] = {
        "epoch": progress.epoch, "step": progress.step, "optimizer": learner.optimizer.state_dict(),
        "scaler": learner.scaler.state_dict(), "best_metrics": plain_values(progress.best_metrics),
        "best_calibration": plain_values(progress.best_calibration),
        "epoch_sums": progress.sums.detach().cpu(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    atomic_torch_save(checkpoint, path)


# Settings a resumed run may change without a word: more epochs, and where and how fast it runs.
RESUMABLE_CHANGES = {"RESUME", "EPOCHS", "CHECKPOINT_DIR", "CACHE_DIR", "DEVICE", "NUM_WORKERS", "LOG_EVERY",
                     "SAVE_EVERY_STEPS"}


def restore_last(path, cfg, model, optimizer, scaler):
    """Load a last checkpoint into model, optimizer, scaler and RNG; returns its resume state."""
    if not Path(path).exists():
        raise UserError(f"Nothing to resume: there is no {path}. Start without --resume, or set --checkpoint-dir to "
                        "the folder of the run to continue.")
    checkpoint = read_checkpoint(path)
    if "resume" not in checkpoint:
        raise UserError(f"{path} holds no training state to resume from; start without --resume.")
    changed = [name for name in ARCHITECTURE_CONSTANTS if checkpoint["architecture"].get(name) != getattr(cfg, name)]
    if changed:
        raise UserError(f"Can't resume: {', '.join(changed)} differ from the run in {path}. Use the same values, "
                        "or a new CHECKPOINT_DIR for a new run.")
    run = checkpoint["run_config"]
    differing = [f"{name} {run[name]!r} -> {getattr(cfg, name)!r}" for name in run
                 if name in CONSTANTS and name not in RESUMABLE_CHANGES and run[name] != getattr(cfg, name)]
    if differing:
        print(f"warning: --resume with settings other than the run's: {', '.join(differing)}. Training goes on with "
              "the new values; for the run it would have been, pass the values it started with.")
    load_trainable_weights(model, checkpoint["model"], path)
    state = checkpoint["resume"]
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    state["history"] = checkpoint.get("history", [])
    return state


def nonfinite_error(epoch, step, cfg, last_path):
    """The UserError for a NaN/inf loss, naming where it happened."""
    kept = f"{last_path} still holds the last good state" if Path(last_path).exists() else "no checkpoint was written yet"
    return UserError(f"The loss became non-finite (NaN/inf) at epoch {epoch}, step {step}. Lower LR (now {cfg.LR}) "
                     f"or try --amp off; {kept}.")


class OneProcess:
    """The run's processes when there is one. Training makes its joint decisions through these calls; under
    torchrun rine_plus_ssca_tools/distributed.py's TorchrunProcesses answers the same calls across the
    processes (a step taken by all or none, one verdict on stopping, the losses of the global batch)."""

    rank, world_size = 0, 1

    def __init__(self, device):
        self.device = device

    def once(self, compute):  # work that reads every file: done by process 0, its result given to all
        return compute()

    def all_have(self, has_images):  # whether every process has images for this step
        return has_images

    def share_stop_reasons(self, bad_logs, stop=None):  # a stop or unreadable images seen by one stops all
        pass

    def gather(self, arrays, bce_sum):  # the validation scores of every process
        return arrays, bce_sum

    def for_training(self, model, cfg):  # DistributedDataParallel under torchrun
        return model

    def first_nonfinite_step(self, first_step):  # the first NaN/inf step of any process
        return first_step

    def seed_dropout(self, seed, epoch, step):  # one process keeps SEED's dropout stream
        pass

    def end_epoch(self, progress, model):  # the global batch's losses, process 0's BatchNorm statistics
        pass

    def wait_for_process_zero(self):
        pass

    def close(self):
        pass


def join_processes(cfg):
    """OneProcess, or this process's place in a torchrun run (WORLD_SIZE > 1), from the package beside this file."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return OneProcess(resolve_device(cfg.DEVICE))
    return tools_module("distributed", "Training under torchrun").join(cfg)


class GracefulStop:
    """Ctrl-C or SIGTERM during training: finish the current step, save, then stop.

    Stopping between steps keeps the saved position exact; a second Ctrl-C stops at once, except
    inside `weights_and_position_together()`, which it leaves first. `requested` is the signal
    received (0 while none).
    """

    def __init__(self):
        self.requested = 0
        self._previous = {}
        self._holding, self._held = False, False

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested = signum
        elif self._holding:
            self._held = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def weights_and_position_together(self):
        """A second Ctrl-C waits for the end of this block, so the weights saved on it are never a step
        ahead of (or behind) the position saved with them."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._held:
            raise KeyboardInterrupt

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals keep their default behaviour
            pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def check(self):
        if self.requested:
            raise KeyboardInterrupt

    def interruption(self, resume_at, last_path):
        """The RunInterrupted to raise once the resume point `resume_at` (epoch, step) is saved in last_path."""
        received = self.requested or signal.SIGINT  # a KeyboardInterrupt without a signal seen here: Ctrl-C
        how = "Ctrl-C" if received == signal.SIGINT else signal.Signals(received).name
        return RunInterrupted(f"Interrupted by {how} at epoch {resume_at[0]}, step {resume_at[1]}; saved {last_path}. "
                              "Continue with --resume.", received)


def end_run_if_asked(bad_logs, procs, stop=None):
    """Between steps: end the run when a split has too many unreadable images (UserError) or when a stop
    was asked for (KeyboardInterrupt, then saved by train). Under torchrun every process reaches the same
    verdict at the same step, whichever of them saw the images or the signal."""
    procs.share_stop_reasons(bad_logs, stop)
    for log in bad_logs:
        log.check()
    if stop is not None:
        stop.check()


class Learner(NamedTuple):
    """The model and what updates it. `step_model` is the model as a training step calls it: under DDP with
    torchrun, compiled with COMPILE, else the model itself; `model` is the plain one, whose weights checkpoints hold."""
    model: nn.Module
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling, on with fp16 only
    device: torch.device
    amp_dtype: torch.dtype  # the backbone's and (on GPUs) the head's mixed precision; None = float32
    world_size: int = 1


def make_learner(model, cfg, procs):
    """The Learner of a model built by build_model: its optimizer, scaler and step_model."""
    amp_dtype = resolve_amp_dtype(cfg.AMP, procs.device)
    step_model = procs.for_training(model, cfg)
    if cfg.COMPILE:
        step_model = torch.compile(step_model)
    return Learner(model, step_model, make_optimizer(model, cfg), torch.amp.GradScaler(
        procs.device.type, enabled=amp_dtype == torch.float16), procs.device, amp_dtype, procs.world_size)


def training_step(learner, batch, cfg, cache=None):
    """Forward and backward on a collated batch (update_weights then takes the step); returns detached
    (BCE sum, SupCon, loss) on the device, no sync."""
    device = learner.device
    pixels = normalise_uint8(batch.pixels.to(device, non_blocking=True))
    labels = batch.labels.to(device, non_blocking=True)
    with head_autocast(device, learner.amp_dtype):
        tokens = tokens_from_cache_or_backbone(learner.model, batch, pixels, cache)
        logits, features = learner.step_model(pixels, tokens)
    bce = bce_loss_sum(logits, labels)
    supcon = supervised_contrastive_loss(features, labels, cfg.SUPCON_TEMPERATURE) if cfg.XI > 0 else bce * 0
    # DDP averages gradients over processes; scaling the per-process BCE sum by their number
    # makes it the gradient of the global batch's BCE sum, as in one process.
    loss = bce * learner.world_size + cfg.XI * supcon
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scaler.scale(loss).backward()
    return bce.detach(), supcon.detach(), loss.detach()


def update_weights(learner):
    """The optimizer step for the gradients training_step left (skipped by the scaler on inf/NaN fp16 gradients)."""
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()


class Progress:
    """Where training stands: what the last checkpoint saves and --resume restores. The steps move it on
    (train_epoch), and so does the end of each epoch (finish_epoch); nothing else changes it."""

    def __init__(self, epoch, step, sums, history=(), best_metrics=None, best_calibration=None):
        self.epoch, self.step = epoch, step  # the epoch under way (1-based) and its steps done
        self.sums = sums  # the epoch's summed BCE, SupCon x images and images, on the device: read at log steps
        self.history = list(history)  # the metrics of every validated epoch
        self.best_metrics, self.best_calibration = best_metrics, best_calibration  # of the best epoch so far

    def add_losses(self, bce, supcon, n_images):
        n_images = torch.full((), float(n_images), device=self.sums.device)  # a fill, not a host-to-device copy
        self.sums += torch.stack([bce, supcon * n_images, n_images])

    def mean_losses(self):
        """(BCE, SupCon) per image of the epoch so far (waits for the GPU)."""
        return (self.sums[:2] / self.sums[2].clamp(min=1)).tolist()

    def finish_epoch(self, metrics, best, calibration):
        """The epoch counts as done: its metrics in the history (the best's with its calibration), and the
        position at the start of the next one."""
        self.history = self.history + [metrics]
        if best:
            self.best_metrics, self.best_calibration = metrics, calibration
        self.epoch, self.step, self.sums = self.epoch + 1, 0, torch.zeros_like(self.sums)


class LossLog:
    """CHECKPOINT_DIR/train_log.csv: one row every LOG_EVERY steps (and at each save and epoch end) with the
    mean losses per image since the row before, to open in a spreadsheet or draw by step. A resumed run
    drops the rows written after its checkpoint, so the log reads as if the run had never stopped. Under
    torchrun the rows hold process 0's share of each batch."""

    COLUMNS = ["epoch", "step", "run_step", "images", "lr", "train_bce", "train_supcon"]

    def __init__(self, path, progress, resumed, rank):
        self.path, self.rank = Path(path), rank
        self.epoch, self.written = progress.epoch, progress.sums.clone()  # the epoch's sums at the last row
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed and self.path.exists():
            with open(self.path, newline="") as f:
                kept = [row for row in csv.reader(f)][1:]
            kept = [row for row in kept if (int(row[0]), int(row[1])) <= (progress.epoch, progress.step)]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows([self.COLUMNS] + kept)

    def write(self, progress, steps_per_epoch, lr):
        """A row for the steps since the last one, if any."""
        if progress.epoch != self.epoch:  # the sums start again at 0 each epoch
            self.epoch, self.written = progress.epoch, torch.zeros_like(progress.sums)
        since = (progress.sums - self.written).tolist()
        self.written = progress.sums.clone()
        if self.rank != 0 or since[2] == 0:
            return
        run_step = (progress.epoch - 1) * steps_per_epoch + progress.step
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([progress.epoch, progress.step, run_step, int(since[2]), lr,
                                    repr(since[0] / since[2]), repr(since[1] / since[2])])


def start_or_resume(cfg, learner):
    """Epoch 1, step 0; or (--resume) where the last checkpoint stopped, with its weights, optimizer and RNG."""
    if not cfg.RESUME:
        return Progress(1, 0, torch.zeros(3, device=learner.device))
    path = Path(cfg.CHECKPOINT_DIR) / LAST_NAME
    state = restore_last(path, cfg, learner.model, learner.optimizer, learner.scaler)
    print(f"resuming from {path}: epoch {state['epoch']}, after step {state['step']}\n")
    return Progress(state["epoch"], state["step"], state["epoch_sums"].to(learner.device), state["history"],
                    state["best_metrics"], state.get("best_calibration"))


def print_set_up(learner, cfg):
    counts = trainable_parameter_counts(learner.model)
    print(f"\nmodel: {sum(counts.values()):,} trainable parameters ("
          + ", ".join(f"{name} {n:,}" for name, n in counts.items()) + "); backbone frozen")
    processes = f" x {learner.world_size} processes" if learner.world_size > 1 else ""
    print(f"device: {learner.device}{processes}, mixed precision: {learner.amp_dtype or 'off'}, "
          f"batch size {cfg.BATCH_SIZE}, {cfg.EPOCHS} epoch(s)\n")


class TrainingData(NamedTuple):
    """What the epochs read: the sampler that orders each epoch, this process's loaders, each split's log of
    unreadable images, and the feature caches (None without CACHE_FEATURES)."""
    sampler: SeededEpochSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    train_bad: BadImageLog
    val_bad: BadImageLog
    train_cache: object = None  # rine_plus_ssca_tools/feature_cache.py's FeatureCache
    val_cache: object = None
    calibration_paths: frozenset = frozenset()  # validation images kept for the calibration (CALIBRATION_FRACTION)


def open_training_data(cfg, train_items, val_items, backbone, procs):
    """The caches (with --cache-features; process 0 makes their files), sampler, loaders and logs of a run."""
    rank, world_size = procs.rank, procs.world_size
    train_cache, val_cache = open_caches(cfg, train_items, val_items, backbone, procs)
    # A last tiny batch would give SupCon few pairs and BatchNorm noisy statistics.
    sampler = SeededEpochSampler(len(train_items), cfg.SEED, cfg.BATCH_SIZE,
                                 drop_last=len(train_items) > cfg.BATCH_SIZE,
                                 n_views=cfg.CACHE_VIEWS if cfg.CACHE_FEATURES else None, rank=rank,
                                 world_size=world_size, view_seed=cfg.DATA_SEED)
    train_loader = make_loader(train_items, cfg, train=True, device=procs.device, sampler=sampler, cache=train_cache,
                               batch_size=cfg.BATCH_SIZE // world_size)
    val_loader = make_loader(val_items[rank::world_size], cfg, train=False, device=procs.device, cache=val_cache)
    return TrainingData(sampler, train_loader, val_loader,
                        BadImageLog("training", train_loader.dataset.paths, cfg.MAX_BAD_FRACTION),
                        BadImageLog("validation", val_loader.dataset.paths, cfg.MAX_BAD_FRACTION,
                                    n_images=len(val_items)),
                        train_cache, val_cache, frozenset(path for path, _, _ in calibration_items(val_items, cfg)))


def open_caches(cfg, train_items, val_items, backbone, procs):
    """(train cache, validation cache) with --cache-features, else (None, None). Process 0 makes the files."""
    if not cfg.CACHE_FEATURES:
        return None, None
    if cfg.EPOCHS > cfg.CACHE_VIEWS:
        print(f"note: feature cache: {cfg.EPOCHS} epochs over {cfg.CACHE_VIEWS} cached views per image, so epochs "
              f"{cfg.CACHE_VIEWS + 1}.. see the views of epochs 1.. again, where a run without the cache draws new "
              f"ones; --cache-views {cfg.EPOCHS} trains what it trains.")
    caches = tools_module("feature_cache", "CACHE_FEATURES (--cache-features)")
    train_folder, val_folder = procs.once(lambda: (
        caches.feature_cache_folder("train", train_items, cfg, backbone, cfg.CACHE_VIEWS),
        caches.feature_cache_folder("val", val_items, cfg, backbone, 1)))
    train_cache = caches.open_feature_cache("train", train_items, cfg, backbone, cfg.CACHE_VIEWS, procs.rank, train_folder)
    val_cache = caches.open_feature_cache("val", val_items, cfg, backbone, 1, procs.rank, val_folder)
    procs.wait_for_process_zero()  # it has made the files
    return train_cache, val_cache


def flush_caches(data):
    for cache in (data.train_cache, data.val_cache):
        if cache is not None:
            cache.flush()


def close_training_data(data):
    """However training ends: the caches written out, the loaders' worker processes ended."""
    flush_caches(data)
    shut_down_workers(data.train_loader, data.val_loader)


def set_learning_rate(optimizer, cfg, epoch):
    """The LR of `epoch`, set from the epoch at every start, so a resumed run has an uninterrupted one's."""
    lr = learning_rate(cfg, epoch)
    if lr != optimizer.param_groups[0]["lr"]:
        print(f"epoch {epoch}: learning rate {lr:g}")
    for group in optimizer.param_groups:
        group["lr"] = lr


class NonfiniteWatch:
    """The first step of an epoch whose loss was NaN/inf. Noted on the device, so that a step never waits
    for the GPU; check() reads it (a sync) at log steps and at the epoch's end, the same in every process."""

    def __init__(self, device):
        self.first_step = torch.full((), -1, device=device)

    def note(self, loss, step):
        is_first = (self.first_step < 0) & ~torch.isfinite(loss)
        self.first_step = torch.where(is_first, step, self.first_step)

    def check(self, epoch, cfg, procs):
        """Stop with a UserError naming the step when a loss was NaN/inf (in any process)."""
        procs.first_nonfinite_step(self.first_step)
        if self.first_step.item() >= 0:
            raise nonfinite_error(epoch, int(self.first_step.item()), cfg, Path(cfg.CHECKPOINT_DIR) / LAST_NAME)


def train_epoch(progress, learner, data, cfg, procs, stop, loss_log):
    """The training steps of the epoch under way, from progress.step on (0, or where a resumed run stopped).

    Between steps: the last checkpoint every SAVE_EVERY_STEPS steps, and the end of the run when a stop
    was asked for or too many images were unreadable (end_run_if_asked). Under torchrun a step is taken
    by every process or by none (procs.all_have).
    """
    from tqdm import tqdm

    epoch = progress.epoch
    set_learning_rate(learner.optimizer, cfg, epoch)
    learner.model.train()
    data.sampler.set_epoch(epoch, start_batch=progress.step)
    batches = tqdm(data.train_loader, desc=f"epoch {epoch}/{cfg.EPOCHS}", initial=progress.step,
                   total=data.sampler.batches_per_epoch(), leave=False, dynamic_ncols=True, disable=procs.rank != 0)
    nonfinite = NonfiniteWatch(learner.device)
    for batch in batches:
        data.train_bad.add(batch.bad, write=batches.write)
        take_step = procs.all_have(batch.pixels is not None)
        if take_step:
            bce, supcon, loss = training_step(learner, batch, cfg, data.train_cache)
            nonfinite.note(loss, progress.step + 1)
        with stop.weights_and_position_together():
            if take_step:
                update_weights(learner)
                progress.add_losses(bce, supcon, len(batch.labels))
            progress.step += 1
        at_save_step = cfg.SAVE_EVERY_STEPS and progress.step % cfg.SAVE_EVERY_STEPS == 0
        if progress.step % cfg.LOG_EVERY == 0 or at_save_step:
            nonfinite.check(epoch, cfg, procs)
            bce_avg, supcon_avg = progress.mean_losses()
            batches.set_postfix(bce=f"{bce_avg:.4f}", supcon=f"{supcon_avg:.4f}")
            loss_log.write(progress, data.sampler.batches_per_epoch(), learner.optimizer.param_groups[0]["lr"])
        if at_save_step and procs.rank == 0:
            save_last(Path(cfg.CHECKPOINT_DIR) / LAST_NAME, learner, progress, cfg)
        end_run_if_asked([data.train_bad], procs, stop)
    batches.close()
    nonfinite.check(epoch, cfg, procs)
    loss_log.write(progress, data.sampler.batches_per_epoch(), learner.optimizer.param_groups[0]["lr"])
    procs.end_epoch(progress, learner.model)  # the global batch's losses; validate exactly what process 0 saves


def validate(progress, learner, data, cfg, procs):
    """Score the validation split (every process's share, gathered) after the epoch's steps; returns the epoch's
    metrics (at temperature 1, the raw P(fake)) and the labels and raw logits the calibration is fitted on (all
    validation images, or with CALIBRATION_FRACTION the share kept apart, which the metrics leave out)."""
    n_seen = max(progress.sums[2].item(), 1.0)
    indices, labels, probs, logits, val_bce_sum, bad = score_loader(learner.model, data.val_loader, learner.device,
                                                                    learner.amp_dtype, data.val_cache)
    data.val_bad.add(bad)
    end_run_if_asked([data.val_bad], procs)
    for_calibration = np.array([data.val_loader.dataset.paths[i] in data.calibration_paths for i in indices], dtype=bool)
    (labels, probs, logits, for_calibration), val_bce_sum = procs.gather((labels, probs, logits, for_calibration),
                                                                         val_bce_sum)
    flush_caches(data)
    calibration_part = (labels[for_calibration], logits[for_calibration])
    if for_calibration.any():  # the best epoch is chosen on the other images only
        labels, probs, logits = labels[~for_calibration], probs[~for_calibration], logits[~for_calibration]
        clipped = np.clip(probs, 1e-7, 1 - 1e-7)
        val_bce_sum = float(-np.sum(np.where(labels == 1, np.log(clipped), np.log1p(-clipped))))
    else:
        calibration_part = (labels, logits)
    metrics = binary_metrics(labels, probs, cfg.THRESHOLD, strict=scores_as_rine(cfg))
    metrics.update(epoch=progress.epoch, train_bce=progress.sums[0].item() / n_seen,
                   train_supcon=progress.sums[1].item() / n_seen, val_bce=val_bce_sum / max(len(labels), 1),
                   skipped_train=len(data.train_bad.bad), skipped_val=len(data.val_bad.bad))
    if data.train_bad.bad or data.val_bad.bad:
        print(f"epoch {progress.epoch}: {len(data.train_bad.bad)} unreadable training and {len(data.val_bad.bad)} "
              "validation images skipped")
    return metrics, *calibration_part


def print_epoch(metrics, started, marker):
    print(f"epoch {metrics['epoch']}: train bce {metrics['train_bce']:.4f} supcon {metrics['train_supcon']:.4f} | "
          f"val bce {metrics['val_bce']:.4f} acc {metrics['acc']:.4f} ap {metrics['ap']:.4f} "
          f"auc {metrics['auc']:.4f} ({time.time() - started:.0f} s){marker}")


def report_interruption(progress, learner, cfg, rank, stop, loss_log, steps_per_epoch):
    """After Ctrl-C or SIGTERM: save the position reached, and the RunInterrupted that says how to continue."""
    last_path = Path(cfg.CHECKPOINT_DIR) / LAST_NAME
    loss_log.write(progress, steps_per_epoch, learner.optimizer.param_groups[0]["lr"])  # the log ends where the checkpoint does
    if rank == 0:
        save_last(last_path, learner, progress, cfg)
    return stop.interruption((progress.epoch, progress.step), last_path)


def out_of_memory_error(cfg):
    return UserError(f"CUDA ran out of memory at batch size {cfg.BATCH_SIZE}. Lower --batch-size (e.g. "
                     f"{max(1, cfg.BATCH_SIZE // 2)}) or --proj-dim, or use fewer --blocks; close other programs on the GPU.")


def report_training(progress, model, data, cfg, procs):
    """After the last epoch: the block importances, the pictures and the table of every epoch's validation."""
    procs.close()
    if data.train_cache is not None and data.train_cache.damaged + data.val_cache.damaged:
        print(f"feature cache: {data.train_cache.damaged + data.val_cache.damaged} damaged entries were recomputed")
    print()
    print_block_importance(model)
    checkpoint_dir = Path(cfg.CHECKPOINT_DIR)
    plots = optional_tools_module("plots", "Drawing training's pictures", "The run is saved without them.")
    if plots and procs.rank == 0:
        plots.plot_training_curves(progress.history, plots.read_loss_log(checkpoint_dir / LOSS_LOG_NAME),
                                   data.sampler.batches_per_epoch(), checkpoint_dir / "training_curves.png")
        plots.plot_block_importance(model, checkpoint_dir / "tie_block_importance.png")
    pictures = f"pictures: {checkpoint_dir / 'training_curves.png'}, {checkpoint_dir / 'tie_block_importance.png'}; "
    print(f"{pictures if plots else ''}losses every {cfg.LOG_EVERY} steps: {checkpoint_dir / LOSS_LOG_NAME}")
    print(f"\nvalidation, every epoch (train losses per image; best by {cfg.SELECT_METRIC} saved to "
          f"{checkpoint_dir / BEST_NAME}):")
    print(format_table(HISTORY_COLUMNS, [history_row(m) for m in progress.history]))
    if progress.best_calibration is not None:
        print()
        print_calibration(progress.best_calibration)


def print_calibration(calibration):
    """The best checkpoint's calibration in a line or two, with a warning when the temperature is at a bound."""
    temperature = calibration["temperature"]
    separated = (f", all on the right side of P(fake) 0.5 (the smoothed targets keep P(fake) from claiming more "
                 f"certainty than {calibration['n_images']} images can show)") if calibration.get("separated") else ""
    print(f"calibration: temperature {temperature:.3g} fitted on {calibration['n_images']} validation images{separated}; "
          f"validation binary ECE over P(fake) {calibration['val_ece_raw']:.3f} -> {calibration['val_ece_calibrated']:.3f}")
    if calibration["at_bound"]:
        print(f"warning: calibration: the temperature stopped at its {temperature_bound_reason(temperature)}. "
              "P(fake) at this temperature is not to be trusted on other images; eval's bin_ece column shows how it does "
              "on a test set.")
    if calibration["fpr_threshold"] is not None:
        raw = f" (on the raw P(fake): {calibration['fpr_threshold_raw']:.4g})" if temperature != 1.0 else ""
        print(f"calibration: threshold {calibration['fpr_threshold']:.4g}{raw} calls {calibration['val_fpr']:.1%} of the validation reals fake "
              f"(TARGET_FPR {calibration['target_fpr']:g}) and finds {calibration['val_fake_recall']:.1%} of the "
              "validation fakes; predict uses it")


def train(cfg):
    """Train with the configuration; returns the path of the best checkpoint.

    Each epoch: the training steps, validation, the best checkpoint by SELECT_METRIC (with the temperature
    fitted on its validation logits) and the last one to resume from. Ctrl-C or SIGTERM stops between
    steps and saves where to continue (--resume).
    """
    validate_config(cfg)
    procs = join_processes(cfg)  # one process, or this one of torchrun's
    seed_everything(cfg.SEED)
    configure_determinism(cfg.DETERMINISTIC)
    train_items, val_items = procs.once(lambda: prepare_splits(cfg))
    if procs.world_size > 1 and len(train_items) < cfg.BATCH_SIZE:
        raise UserError(f"{len(train_items)} training images are fewer than one batch of {cfg.BATCH_SIZE}; lower --batch-size.")
    model = build_model(cfg, procs.device)
    learner = make_learner(model, cfg, procs)
    print_set_up(learner, cfg)
    progress = start_or_resume(cfg, learner)
    if progress.epoch > cfg.EPOCHS:
        print(f"nothing left to do: the run in {cfg.CHECKPOINT_DIR} finished its {progress.epoch - 1} epoch(s), and "
              f"EPOCHS is {cfg.EPOCHS}; pass a larger --epochs with --resume to train on.")
    procs.seed_dropout(cfg.SEED, progress.epoch, progress.step)
    data = open_training_data(cfg, train_items, val_items, model.backbone, procs)
    best_path, last_path = Path(cfg.CHECKPOINT_DIR) / BEST_NAME, Path(cfg.CHECKPOINT_DIR) / LAST_NAME
    provenance()  # worked out now (it reads the source and asks git), so that saving on the way out stays quick
    loss_log = LossLog(Path(cfg.CHECKPOINT_DIR) / LOSS_LOG_NAME, progress, cfg.RESUME, procs.rank)
    with GracefulStop() as stop:
        try:
            while progress.epoch <= cfg.EPOCHS:
                started = time.time()
                train_epoch(progress, learner, data, cfg, procs, stop, loss_log)
                metrics, val_labels, val_logits = validate(progress, learner, data, cfg, procs)
                best = is_better(cfg.SELECT_METRIC, metrics, progress.best_metrics)
                calibration = calibration_record(val_labels, val_logits, cfg.TARGET_FPR) if best else None
                if best and procs.rank == 0:
                    atomic_torch_save(make_checkpoint(model, progress.epoch, metrics, progress.history + [metrics],
                                                      calibration, config=cfg), best_path)
                # The epoch counts as done only from here: an interruption before this line resumes
                # at its validation, one after it at the next epoch.
                progress.finish_epoch(metrics, best, calibration)
                if procs.rank == 0:
                    save_last(last_path, learner, progress, cfg)
                print_epoch(metrics, started, f"  <- best {cfg.SELECT_METRIC}, saved {best_path}" if best else "")
                end_run_if_asked([], procs, stop)
        except KeyboardInterrupt:
            raise report_interruption(progress, learner, cfg, procs.rank, stop, loss_log,
                                      data.sampler.batches_per_epoch())
        except torch.cuda.OutOfMemoryError:
            raise out_of_memory_error(cfg)
        finally:
            close_training_data(data)
    report_training(progress, model, data, cfg, procs)
    return best_path


HISTORY_COLUMNS = ["epoch", "train_bce", "train_supcon", "val_bce", "acc", "ap", "auc", "real_acc", "fake_acc"]


def history_row(metrics):
    """One epoch's metrics as a row of HISTORY_COLUMNS."""
    return [metrics["epoch"]] + [float(metrics[c]) for c in HISTORY_COLUMNS[1:]]


# =====================================================================================
# Command line
# =====================================================================================

class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line and suggests the option meant."""

    def error(self, message):
        match = re.search(r"unrecognized arguments: (\S+)", message)
        if match:
            options = [o for action in self._actions for o in action.option_strings]
            close = difflib.get_close_matches(match.group(1).split("=")[0], options, n=1)
            if close:
                message += f" (did you mean {close[0]}?)"
        print(f"{self.prog}: error: {message}. Run with --help to see the options.", file=sys.stderr)
        sys.exit(2)


def option_name(constant):
    """BATCH_SIZE -> --batch-size."""
    return "--" + constant.lower().replace("_", "-")


def build_train_parser():
    """Training options: one per constant at the top of the file, plus --demo and --debug."""
    parser = OneLineErrorParser(
        prog="rine_plus_ssca.py", allow_abbrev=False, argument_default=argparse.SUPPRESS,
        description="Train RINE+SSCA (default), or run a command: eval, predict, check-data, export, import-rine (e.g. `rine_plus_ssca.py eval --help`). Every constant at the top of the file is an option.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="offline demo: generated data, tiny random backbone")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--seeds", type=number_list(int), metavar="0,1,2",
                        help="train the same configuration once per seed, in CHECKPOINT_DIR/seed_<n>, then print the "
                        "validation metrics as mean +- std (the feature cache and validation images are shared)")
    for name, constant in CONSTANTS.items():
        default = constant.default
        text = f"{constant.help} (default: {default!r})".replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(option_name(name), dest=name, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(option_name(name), dest=name, type=type(default), choices=CHOICES.get(name),
                                metavar=name, help=text)
    parser.formatter_class = argparse.HelpFormatter  # defaults are already in the text
    return parser


def add_model_options(parser, several=False):
    """Options shared by the commands that load a checkpoint (several: --ckpt takes one or more)."""
    if several:
        parser.add_argument("--ckpt", required=True, nargs="+", help="checkpoint file (.pth) written by training; "
                            "several (e.g. one per seed) print mean +- std per row over them")
    else:
        parser.add_argument("--ckpt", required=True, help="checkpoint file (.pth) written by training")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=None, help="P(fake) at or above which an image is fake (default: the checkpoint's THRESHOLD; predict uses the threshold chosen on validation reals when TARGET_FPR was set in training)")
    parser.add_argument("--uncalibrated", action="store_true", help="show the raw P(fake), sigmoid(logit), instead of the calibrated sigmoid(logit / temperature) with the temperature fitted on the validation set")
    parser.add_argument("--tencrop", action="store_true", help="score ten crops, P(fake) = sigmoid of the mean of their logits (RINE's test-time averaging for large images)")
    parser.add_argument("--clip-model", default=None, help="load the backbone from here instead of the checkpoint's CLIP_MODEL")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def number_list(kind):
    """'95,75,50' -> [95, 75, 50] for argparse."""
    def parse(text):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return parse


def check_numbers(args):
    """Refuse impossible numbers given to a command (e.g. --batch-size 0) with a one-line UserError."""
    at_least = {"batch_size": 1, "num_workers": 0, "max_per_class": 1, "bootstrap": 0, "workers": 1, "min_side": 1}
    for name, low in at_least.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low} (got {value}).")
    for name in ("threshold", "target_fpr"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1 (got {value}).")
    if any(not 1 <= q <= 100 for q in getattr(args, "jpeg_quality", [])):
        raise UserError(f"--jpeg-quality values must be between 1 and 100 (got {args.jpeg_quality}).")
    if any(not 0 <= s < math.inf for s in getattr(args, "blur_sigma", [])):
        raise UserError(f"--blur-sigma values must be 0 or more (got {args.blur_sigma}).")


def count_of(n, noun):
    """'1 file', '3 files'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def build_eval_parser():
    """Options of the eval command."""
    parser = OneLineErrorParser(prog="rine_plus_ssca.py eval", allow_abbrev=False,
                                description="Evaluate a checkpoint: one row per generator, named as the papers name it, plus a mean row over the rows holding both classes.")
    add_model_options(parser, several=True)
    parser.add_argument("--data", required=True, help="folder holding <generator>/[<category>/]0_real|1_fake (or real|fake, nature|ai)")
    parser.add_argument("--protocol", default=None, help="a protocol file naming each row's fake and real folders, in order: protocols/rine20.json (RINE's 20 test sets), protocols/synthbuster.json, protocols/genimage.json (GenImage's 8 val sets)")
    parser.add_argument("--real-dir", default=None, help="shared real images for every row that has none (then images in no label folder count as fakes); with a protocol: replaces its real_dir")
    parser.add_argument("--max-per-class", type=int, default=None, help="seeded sample of at most N images per class and generator")
    parser.add_argument("--jpeg-quality", type=number_list(int), default=[], help="JPEG quality for every test image, or a sweep: 95,75,50,30")
    parser.add_argument("--blur-sigma", type=number_list(float), default=[], help="Gaussian blur sigma for every test image, or a sweep: 1,2,3")
    parser.add_argument("--resize", type=number_list(float), default=[], help="rescale every test image by this factor before the crop (bicubic, antialiased), or a sweep: 0.5,0.75,1.5")
    parser.add_argument("--target-fpr", type=float, default=None, help="also report the threshold giving this false-positive rate on the real images of --data, e.g. 0.05: measured on these test images (an oracle), not a way to choose a threshold (train with TARGET_FPR for that)")
    parser.add_argument("--out", default=None, help="folder for the CSV/Markdown tables and plots (default: next to the checkpoint)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-per-class sample and of the bootstrap")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples for the 95%% intervals of ACC, AP and AUC (0 = none)")
    parser.add_argument("--scores", default=None, metavar="FILE.csv", help="where the per-image scores go (default: <out>/<table name>_scores.csv); compare reads them")
    return parser


def build_predict_parser():
    """Options of the predict command."""
    parser = OneLineErrorParser(prog="rine_plus_ssca.py predict", allow_abbrev=False,
                                description="P(fake) and a verdict for each of your images.")
    add_model_options(parser)
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", default=None, help="also write the results to this CSV file")
    parser.add_argument("--explain", default=None, metavar="DIR", help="also write a heatmap per image into DIR: the crop and where it looks generated (docs/GUIDE.md, Heatmaps)")
    return parser


def run_eval(args):
    """The eval command: for each checkpoint, per-generator tables (clean, then each perturbation level) with
    bootstrap intervals, per-image scores, CSV/Markdown, plots; with several checkpoints (seeds of one
    configuration), then mean +- std per row over them."""
    check_numbers(args)
    if any(factor <= 0 for factor in args.resize):
        raise UserError(f"--resize takes factors above 0 (0.5 halves each side), got {args.resize}.")
    if len(args.ckpt) > 1 and args.scores:
        raise UserError("--scores names one file, but several checkpoints are given; leave it out (each checkpoint's "
                        "scores are written beside its tables).")
    for ckpt in args.ckpt:  # a wrong path is told before the test folder is read
        if not Path(ckpt).is_file():
            read_checkpoint(ckpt)  # its one-line error names the file (missing, or a folder)
    items = collect_test_items(args.data, args.real_dir, args.max_per_class, args.seed, args.protocol)
    tables = []
    for index, ckpt in enumerate(args.ckpt):
        if len(args.ckpt) > 1:
            print(f"\n=== checkpoint {index + 1} of {len(args.ckpt)}: {ckpt}")
        out_dir = Path(args.out) if args.out else Path(ckpt).parent
        if args.out and len(args.ckpt) > 1:  # one folder per checkpoint, so that their files do not collide
            out_dir = out_dir / f"{index + 1}_{Path(ckpt).resolve().parent.name}"
        tables.append(evaluate_checkpoint(args, ckpt, items, out_dir))
    if len(args.ckpt) > 1:
        statistics = tools_module("statistics", "eval over several checkpoints")
        out_dir = Path(args.out) if args.out else common_folder(args.ckpt)
        statistics.write_seed_summary(args, tables, out_dir, eval_stem(args))
    return tables[0]["csv_rows"] if len(tables) == 1 else tables


def common_folder(paths):
    """The deepest folder holding all these files."""
    return Path(os.path.commonpath([str(Path(path).resolve().parent) for path in paths]))


def eval_stem(args, ckpt=None):
    """Output files are named by what was evaluated, so that another evaluation never overwrites them:
    the data folder, the protocol, the options that change the scores, and the checkpoint when it is not
    a training run's best one. eval_test, eval_test_rine20_tencrop_jpeg95-75, eval_test_rine_imported, ..."""
    parts = ["eval", Path(args.data).resolve().name or "data"]
    if args.protocol:
        parts.append(Path(args.protocol).stem)
    if args.real_dir:
        parts.append("reals-" + Path(args.real_dir).resolve().name)
    if args.tencrop:
        parts.append("tencrop")
    for name, values in (("jpeg", args.jpeg_quality), ("blur", args.blur_sigma), ("resize", args.resize)):
        if values:
            parts.append(name + "-".join(f"{v:g}" for v in values))
    if args.max_per_class:
        parts.append(f"max{args.max_per_class}-seed{args.seed}")
    if args.uncalibrated:
        parts.append("uncalibrated")
    if args.threshold is not None:
        parts.append(f"threshold{args.threshold:g}")
    if ckpt is not None and Path(ckpt).name != BEST_NAME:
        parts.append(Path(ckpt).stem)
    return "_".join(parts)


SCORE_COLUMNS = ["condition", "row", "path", "label", "logit", "p_fake_raw", "p_fake", "threshold", "fake_when",
                 "protocol", "checkpoint"]


def evaluate_checkpoint(args, ckpt, items, out_dir):
    """eval for one checkpoint: {"checkpoint", "csv_rows": the tables' rows, "scored": {condition: ([(row name,
    labels, P(fake))], table rows)}}."""
    protocols = tools_module("protocols", "eval --protocol") if args.protocol else None
    try:  # the pictures and intervals are optional: without the package the tables are still written
        plots, statistics, no_tools = (tools_module("plots", "drawing eval's pictures and intervals"),
                                       tools_module("statistics", "drawing eval's pictures and intervals"), None)
    except UserError as missing:
        plots, statistics, no_tools = None, None, f"note: {missing} The tables are written without pictures and intervals."
    model = load_detector(ckpt, clip_model=args.clip_model, device=args.device, calibrated=not args.uncalibrated)
    threshold = model.config["THRESHOLD"] if args.threshold is None else args.threshold  # the papers' protocol
    strict = scores_as_rine(model.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = eval_stem(args, ckpt)
    scores_path = Path(args.scores) if args.scores else out_dir / f"{stem}_scores.csv"
    perturbations = {"jpeg": ("jpeg_quality", "quality"), "blur": ("blur_sigma", "sigma"), "resize": ("resize", "factor")}
    conditions = [("clean", None)] + [(kind, level) for kind in perturbations for level in getattr(args, perturbations[kind][0])]
    columns = ["generator"] + METRIC_COLUMNS
    probabilities_are = describe_probabilities(model)
    print(probabilities_are)
    markdown = [f"# {args.data} with {ckpt} (threshold {threshold})\n", f"{probabilities_are}.\n"]
    if args.protocol:
        protocol = protocols.read_protocol(args.protocol)
        line = f"protocol {args.protocol}" + (f": {protocol['description']}" if protocol.get("description") else "")
        print(line)
        markdown.append(f"{line}\n")
        notes = [] if args.max_per_class else protocols.expected_count_notes(protocol, items)  # a sample has fewer
        for note in notes:
            print(f"note: {note}")
            markdown.append(f"\nNote: {note}\n")
    csv_rows, interval_rows, score_rows, mean_rows, written = [], [], [], {}, [f"{stem}.csv", f"{stem}.md"]
    scored = {}
    for kind, level in conditions:
        options = {perturbations[kind][0]: level} if kind != "clean" else {}
        rows, kept, labels, probs, logits = evaluate_items(model, items, args.batch_size, args.num_workers, threshold,
                                                           tencrop=args.tencrop, **options)
        condition = "clean" if kind == "clean" else f"{kind} {perturbations[kind][1]} {level}"
        print(f"\n{args.data} [{condition}], threshold {threshold}:")
        print(format_table(columns, rows))
        refuse_rows_missing_images(rows, model.config["MAX_BAD_FRACTION"], condition, args.data)
        markdown += [f"\n## {condition}\n", format_markdown_table(columns, rows)]
        csv_rows += [[condition] + row for row in rows]
        mean_rows[(kind, level)] = mean_row_of(rows)
        raw = probabilities_from_logits(logits, float32=strict)  # P(fake) at T = 1, whatever the model's temperature
        mean_logits = logits.mean(axis=1) if logits.ndim == 2 else logits
        score_rows += [[condition, row, path, label, float(z), float(p_raw), float(p), threshold, ">" if strict else ">=",
                        args.protocol or "", str(ckpt)]
                       for (path, label, row), z, p_raw, p in zip(kept, mean_logits, raw, probs)]
        row_of = np.array([item[2] for item in kept], dtype=object)
        by_row = [(name, labels[row_of == name], probs[row_of == name]) for name in dict.fromkeys(row_of)]
        scored[condition] = (by_row, rows)
        if statistics and args.bootstrap:
            intervals = statistics.table_intervals(by_row, threshold, strict, args.bootstrap, args.seed)
            interval_columns, table = statistics.interval_table(intervals, rows)
            print(f"\n{CONFIDENCE_WORDS}, from {args.bootstrap} bootstrap resamples of the images (seed {args.seed}):")
            print(format_table(interval_columns, table))
            markdown += [f"\n{CONFIDENCE_WORDS} ({args.bootstrap} bootstrap resamples of the images, seed {args.seed}):\n",
                         format_markdown_table(interval_columns, table)]
            interval_rows += [[condition] + row for row in table]
        if kind != "clean":
            continue
        note = one_class_note(rows)
        if note:
            print(f"note: {note}")
            markdown.append(f"\nNote: {note}\n")
        if plots and set(labels.tolist()) == {0, 1}:
            plots.plot_roc_pr(labels, probs, out_dir / f"{stem}_roc_pr.png")
            written.append(f"{stem}_roc_pr.png")
        calibrated = {f"calibrated P(fake), T = {model.temperature:.3g}": probs} if model.temperature != 1.0 else {}
        if plots:
            plots.plot_reliability(labels, {**calibrated, "raw P(fake), T = 1": raw},
                                   out_dir / f"{stem}_reliability.png")
            written.append(f"{stem}_reliability.png")
        lines = calibration_lines(model, labels, probs, raw, args.tencrop)
        if args.target_fpr is not None and not (labels == 0).any():
            print("note: --target-fpr needs real images; there are none here.")
        elif args.target_fpr is not None:
            t = threshold_for_fpr(probs[labels == 0], args.target_fpr)
            lines.append(f"threshold for a false-positive rate of {args.target_fpr:g} on these real images: {t:.4f} "
                         f"(fake recall there: {rates_at(labels, probs, t)[1]:.4f})")
        print()
        for line in lines:
            print(line)
            markdown.append(f"\n{line}\n")
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        csv.writer(f).writerows([["condition"] + columns] + [[_cell(v) for v in row] for row in csv_rows])
    if interval_rows:
        with open(out_dir / f"{stem}_intervals.csv", "w", newline="") as f:
            csv.writer(f).writerows([["condition"] + interval_columns] + [[_cell(v) for v in row] for row in interval_rows])
        written.append(f"{stem}_intervals.csv")
    scores_path.parent.mkdir(parents=True, exist_ok=True)
    with open(scores_path, "w", newline="") as f:
        csv.writer(f).writerows([SCORE_COLUMNS] + [[repr(v) if isinstance(v, float) else v for v in row]
                                                   for row in score_rows])
    written.append(str(scores_path) if args.scores else scores_path.name)
    (out_dir / f"{stem}.md").write_text("\n".join(markdown) + "\n")
    for kind in perturbations:
        levels = [level for k, level in conditions if k == kind]
        if plots and levels and mean_rows[("clean", None)] is not None:
            plots.plot_robustness(kind, levels, [mean_rows[(kind, level)] for level in levels],
                                  mean_rows[("clean", None)], out_dir / f"{stem}_robustness_{kind}.png")
            written.append(f"{stem}_robustness_{kind}.png")
    print()
    print_block_importance(model)
    if plots:
        tie_plot = f"tie_block_importance_{Path(ckpt).stem}.png"  # not training's own tie_block_importance.png
        plots.plot_block_importance(model, out_dir / tie_plot)
        written.append(tie_plot)
    if no_tools:
        print(no_tools)
    print(f"wrote in {out_dir}: " + ", ".join(written))
    return {"checkpoint": str(ckpt), "csv_rows": csv_rows, "scored": scored}


CONFIDENCE_WORDS = "95% intervals (images resampled within each class of each row; they do not cover training seeds)"


def refuse_rows_missing_images(rows, max_fraction, condition, data_dir):
    """UserError when a row of an eval table lost more than max_fraction of its images (files that could not
    be read or scored): its metrics would describe another set of images than the one named."""
    for row in (rows[:-1] if mean_row_of(rows) is not None else rows):
        n_skipped = row[-1]
        n_images = row[1] + row[2] + n_skipped
        if n_skipped > max_fraction * n_images:
            raise UserError(f"{n_skipped} of {n_images} images of the row {row[0]!r} [{condition}] could not be scored "
                            f"(more than MAX_BAD_FRACTION={max_fraction}). Run `python rine_plus_ssca.py check-data "
                            f"--data {data_dir}` to list them, then remove or re-download them.")


def stored_threshold_note(tencrop):
    """The line saying that the stored TARGET_FPR threshold meets scores it was not chosen on, or None."""
    if not tencrop:
        return None
    return ("note: the stored threshold was chosen on the P(fake) of single centre crops of the validation images; "
            "with --tencrop it is applied to ten-crop scores, so its false-positive rate may differ")


BIN_ECE_NOTE = (f"bin_ece: the binary ECE over P(fake) ({ECE_BINS} equal bins of P(fake)), not the top-label ECE "
                "over max(P, 1 - P) that papers often report")


def calibration_lines(model, labels, probs, raw_probs, tencrop=False):
    """eval's lines on the calibration, for the clean test images: what the bin_ece column is, the binary ECE
    of all of them pooled (and of the raw P(fake)) with their top-label ECE beside it, and what the checkpoint's TARGET_FPR threshold, chosen on
    validation reals, does here."""
    pooled = f"binary ECE over P(fake) of all {len(labels)} images pooled: {expected_calibration_error(labels, probs):.4f}"
    if model.temperature != 1.0:
        pooled += f" (raw P(fake), sigmoid(logit): {expected_calibration_error(labels, raw_probs):.4f})"
    pooled += f"; top-label ECE, to compare with papers: {top_label_calibration_error(labels, probs):.4f}"
    lines = [BIN_ECE_NOTE, pooled]
    stored = stored_threshold(model)
    if stored is not None:
        fpr, recall = rates_at(labels, probs, stored, strict=scores_as_rine(model.config))
        lines.append(f"stored threshold {stored:.4g} (TARGET_FPR {model.calibration['target_fpr']:g}, chosen on "
                     f"validation reals): on these images it calls {fpr:.4f} of the reals fake (false-positive rate) "
                     f"and finds {recall:.4f} of the fakes")
        if stored_threshold_note(tencrop):
            lines.append(stored_threshold_note(tencrop))
    return lines


def gather_images(inputs):
    """Files named directly, plus image files found in folders: (files, missing inputs, other files in folders)."""
    files, missing, others = [], [], 0
    for entry in inputs:
        path = Path(entry)
        if path.is_file():
            files.append(str(path))
        elif path.is_dir():
            for found in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                if found.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(str(found))
                else:
                    others += 1
        else:
            missing.append(entry)
    return files, missing, others


def run_predict(args):
    """The predict command: one line per image, unreadable files reported and skipped."""
    check_numbers(args)
    files, missing, others = gather_images(args.inputs)
    for entry in missing:
        print(f"not found, skipped: {entry}", file=sys.stderr)
    if others:
        print(f"note: {count_of(others, 'file')} without an image extension in the folders were not scored", file=sys.stderr)
    if not files:
        raise UserError("No image files to score; pass image files or folders that contain some.")
    if args.explain and Path(args.explain).exists() and not Path(args.explain).is_dir():
        raise UserError(f"--explain takes a folder for the pictures, but {args.explain} is a file; name a folder.")
    heatmaps = tools_module("heatmaps", "predict --explain") if args.explain else None
    model = load_detector(args.ckpt, clip_model=args.clip_model, device=args.device, calibrated=not args.uncalibrated)
    threshold, stored_note = decision_threshold(model, args.threshold)
    scores, _, unreadable = score_items(model, [(f, 0, "") for f in files], args.batch_size, args.num_workers,
                                        args.tencrop)
    results = []
    print(f"{'P(fake)':>8}  verdict  image")
    for path in files:
        if path in scores:
            p = scores[path]
            verdict = "fake" if called_fake(p, threshold, strict=scores_as_rine(model.config)) else "real"
            # A sharpening temperature gives P(fake) far below 0.0001, which a stored threshold can still split.
            print(f"{p:8.4f}  {verdict:7}  {path}" if p >= 1e-4 or p == 0 else f"{p:8.1e}  {verdict:7}  {path}")
            results.append([path, f"{p:.6g}", verdict])
        else:
            print(f"{'-':>8}  {'skipped':7}  {path} (not a readable image)")
            results.append([path, "", "unreadable"])
    n_fake = sum(1 for r in results if r[2] == "fake")
    shown = threshold if stored_note is None else f"{threshold:.4g}"  # as given or configured; a stored one rounded
    print(f"\n{count_of(len(scores), 'image')} scored ({n_fake} fake, {len(scores) - n_fake} real at threshold {shown}); "
          f"{len(set(unreadable))} unreadable skipped")
    print(describe_probabilities(model))
    if stored_note:
        print(f"{stored_note}, chosen in training; --threshold overrides it")
        if stored_threshold_note(args.tencrop):
            print(stored_threshold_note(args.tencrop))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            csv.writer(f).writerows([["path", "p_fake", "verdict"]] + results)
        print(f"wrote {args.out}")
    if args.explain:
        written = heatmaps.write_explanations(model, [path for path in files if path in scores], args.explain,
                                              threshold, args.batch_size)
        print(f"wrote {count_of(len(written), 'heatmap')} in {args.explain}" + (" (unreadable images have none)" if unreadable else ""))
        if args.tencrop:
            print("note: a heatmap covers the centre crop, and the P(fake) in its title is that crop's, not the ten-crop mean")
    return results


def run_demo(cfg):
    """The offline demo: generated data, a tiny random backbone, training, a per-generator test table."""
    started = time.time()
    print("DEMO: generated images and a tiny, randomly initialised CLIP-shaped backbone, all offline.\n"
          "It proves the pipeline runs end to end; it says nothing about how well the detector works on real images.\n")
    make_demo_dataset(Path(cfg.DATA_DIR), seed=cfg.SEED)
    if cfg.CLIP_MODEL == DEMO_OVERRIDES["CLIP_MODEL"]:
        make_tiny_backbone(cfg.CLIP_MODEL, seed=cfg.SEED)
    best_path = train(cfg)
    model = load_detector(best_path, device=cfg.DEVICE)
    test_dir = Path(cfg.DATA_DIR) / "test"
    if test_dir.is_dir():
        rows = evaluate_folder(model, test_dir, cfg.BATCH_SIZE, cfg.NUM_WORKERS)[0]
        print(f"\ntest set {test_dir} ('transposed_conv' is a generator not seen in training):")
        print(describe_probabilities(model))
        print(format_table(["generator"] + METRIC_COLUMNS, rows))
    # Used elsewhere offline, the checkpoint needs its backbone folder too (--clip-model): say where it is.
    backbone = Path(cfg.CLIP_MODEL).resolve() if Path(cfg.CLIP_MODEL).is_dir() else cfg.CLIP_MODEL
    print(f"\nDemo finished in {time.time() - started:.0f} s; checkpoint: {best_path}\n"
          f"its backbone (give it to --clip-model where the checkpoint cannot find it): {backbone}\n"
          "This was the pipeline on toy data, not a trained detector. Real training needs real and generated images\n"
          "(e.g. ForenSynths/CNNDetection or GenImage under data/train) and the real CLIP ViT-L/14 backbone\n"
          "(downloaded once, or a local folder in CLIP_MODEL), ideally on a GPU: see README.md.")


COMMANDS = {
    "eval": (build_eval_parser, run_eval),
    "predict": (build_predict_parser, run_predict),
}
# Commands kept in the package beside this file: command -> its module there, whose COMMANDS gives
# (parser builder, runner) as above. Imported only when such a command runs.
TOOL_COMMANDS = {"check-data": "data_check", "export": "rine_format", "import-rine": "rine_format", "compare": "compare"}


def main(argv=None):
    """Command-line entry point; returns the exit code (1 for a user mistake, printed as one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    commands = [*COMMANDS, *TOOL_COMMANDS]
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        close = difflib.get_close_matches(argv[0], commands, n=1)
        print(f"rine_plus_ssca.py: error: unknown command {argv[0]!r}" + (f" (did you mean {close[0]}?)" if close else "")
              + f". Commands: {', '.join(commands)}; without one the script trains. Run with --help to see the options.",
              file=sys.stderr)
        return 2
    try:
        if argv and argv[0] in commands:
            if argv[0] in COMMANDS:
                parser_builder, runner = COMMANDS[argv[0]]
            else:
                parser_builder, runner = tools_module(TOOL_COMMANDS[argv[0]], argv[0]).COMMANDS[argv[0]]
            result = runner(parser_builder().parse_args(argv[1:]))
            return result if isinstance(result, int) else 0
        given = vars(build_train_parser().parse_args(argv))
        demo, seeds = given.pop("demo", False), given.pop("seeds", None)
        given.pop("debug", None)
        cfg = default_config()
        if demo:
            cfg.__dict__.update(DEMO_OVERRIDES)
        cfg.__dict__.update(given)
        validate_config(cfg)
        if demo and seeds is not None:
            raise UserError("--seeds trains your data; run --demo once first, then train on data/demo with --seeds "
                            "(docs/GUIDE.md, Comparing models).")
        if seeds is not None:
            tools_module("seeds", "--seeds").train_seeds(cfg, seeds)
        else:
            run_demo(cfg) if demo else train(cfg)
        return 0
    except RunInterrupted as stopped:  # saved where to resume: a message, not an error
        print(stopped, file=sys.stderr)
        return stopped.exit_code
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # The package's `import rine_plus_ssca` then finds this module, not a second copy with its own UserError.
    sys.modules.setdefault("rine_plus_ssca", sys.modules["__main__"])
    sys.exit(main())
