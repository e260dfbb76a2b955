"""Throughput and memory of rine_plus_ssca.py, on random weights (nothing is downloaded).

    python benchmarks/throughput.py --arch tiny                     # seconds on any CPU
    python benchmarks/throughput.py --arch vitl --images 16 --batch-size 8    # ViT-L/14 on a CPU: minutes
    python benchmarks/throughput.py --arch vitl --images 512 --batch-size 128 --device cuda
    python benchmarks/throughput.py --arch vitl --images 16 --batch-size 8 --no-use-spectral   # RINE alone

Any other option of rine_plus_ssca.py (--no-use-spectral, --spec-channels 128, --amp off, ...)
sets that constant for every measurement.

Prints, each the median of --repeats timed runs after one warm-up:
  train        images/s of a training epoch (frozen backbone + head, optimizer step) as configured:
               mixed precision (bf16 where the device has it), SDPA attention, blocks after the last
               one used not computed
  train-slow   the same epoch with mixed precision, SDPA and truncation switched off
  eval         images/s of scoring (inference mode)
  backbone     images/s of the frozen backbone alone, and its achieved TFLOP/s from a FLOP count
               (torch.utils.flop_counter), not from a guess
  cached       images/s of a training epoch that reads the feature cache (CACHE_FEATURES)
and the peak memory (GPU: max allocated; CPU: peak resident set of the process).
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rine_plus_ssca as rps  # noqa: E402
from rine_plus_ssca_tools import feature_cache  # noqa: E402

ARCHITECTURES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, patch_size=32),
    "vitl": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14),
}


def make_backbone(arch, folder):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=224, projection_dim=768, **ARCHITECTURES[arch])).save_pretrained(folder)


def make_images(folder, n_images):
    rng = np.random.default_rng(0)
    items = []
    for i in range(n_images):
        fake = i % 2 == 1
        path = Path(folder) / ("1_fake" if fake else "0_real") / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # benchmarks/gpu_check.py asks for the same images several times
            Image.fromarray(rps.make_demo_image(rng, fake, "bilinear")).save(path)
        items.append((str(path), int(fake), "."))
    return items


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device, repeats):
    """Median seconds of `repeats` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def training_epoch(model, loader, sampler, cfg, device, cache=None, step_model=None):
    """One epoch of the script's training step over the loader (step_model: e.g. the torch.compile'd model)."""
    learner = rps.make_learner(model, cfg, rps.OneProcess(device))
    if step_model is not None:
        learner = learner._replace(step_model=step_model)
    sampler.set_epoch(1)
    model.train()

    def run():
        for batch in loader:
            rps.training_step(learner, batch, cfg, cache)
            rps.update_weights(learner)
    return run


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="tiny")
    parser.add_argument("--images", type=int, default=64, help="images in the benchmark's training set")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--skip-slow", action="store_true", help="skip the train-slow measurement")
    args, script_options = parser.parse_known_args()
    overrides = vars(rps.build_train_parser().parse_args(script_options))  # exits with a one-line error if unknown
    for flag in ("demo", "debug"):  # the script's own flags, not constants
        overrides.pop(flag, None)
    cfg = rps.default_config()
    cfg.__dict__.update(overrides)
    try:
        rps.validate_config(cfg)
    except rps.UserError as error:
        sys.exit(f"error: {error}")

    with tempfile.TemporaryDirectory(prefix="rps_bench_") as work:  # removed afterwards: a ViT-L backbone is 1.2 GB
        measure(args, cfg, overrides, Path(work))


def measure(args, cfg, overrides, work):
    """Print every figure; returns them as a dict (images/s, TFLOP/s, GB, kB)."""
    if not (work / "backbone").exists():  # benchmarks/gpu_check.py measures twice with one backbone
        make_backbone(args.arch, work / "backbone")
    items = make_images(work / "images", args.images)
    cfg.CLIP_MODEL, cfg.BATCH_SIZE, cfg.NUM_WORKERS = str(work / "backbone"), args.batch_size, args.num_workers
    cfg.CHECKPOINT_DIR, cfg.CACHE_DIR, cfg.CACHE_VIEWS = str(work / "ckpt"), str(work / "cache"), 1
    device = rps.resolve_device(args.device)
    cfg.DEVICE = str(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = rps.resolve_amp_dtype(cfg.AMP, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"arch {args.arch}, batch {args.batch_size}, {args.images} images, device {device} ({name}), "
          f"mixed precision {amp_dtype or 'off'}, torch {torch.__version__}, median of {args.repeats} after 1 warm-up"
          + (f", constants changed: {overrides}" if overrides else "") + "\n")

    rows = []

    def report(label, seconds, n_images, extra=""):
        rate = n_images / seconds
        rows.append((label, rate))
        print(f"{label:12s} {rate:10.2f} images/s   ({seconds:.3f} s for {n_images} images){extra}", flush=True)
        return rate

    sampler = rps.SeededEpochSampler(len(items), cfg.SEED, cfg.BATCH_SIZE, drop_last=True)
    n_trained = sampler.batches_per_epoch() * cfg.BATCH_SIZE

    # -- the configured, fast path
    model = rps.build_model(cfg, device)
    loader = rps.make_loader(items, cfg, train=True, device=device, sampler=sampler)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_rate = report("train", timed(training_epoch(model, loader, sampler, cfg, device), device, args.repeats), n_trained)
    train_peak = peak_memory_gb(device)

    eval_loader = rps.make_loader(items, cfg, train=False, device=device)
    eval_rate = report("eval", timed(lambda: rps.score_loader(model, eval_loader, device, amp_dtype), device, args.repeats),
                       len(items))

    # -- the backbone alone: FLOPs counted once, then timed
    from torch.utils.flop_counter import FlopCounterMode

    pixels = rps.normalise_uint8(next(iter(eval_loader)).pixels.to(device))
    with torch.inference_mode(), rps.head_autocast(device, amp_dtype):
        counter = FlopCounterMode(display=False)
        with counter:
            model.backbone(pixels)
        flops_per_image = counter.get_total_flops() / len(pixels)

        def backbone_forward():
            model.backbone(pixels)
        seconds = timed(backbone_forward, device, args.repeats)
    backbone_rate = report("backbone", seconds, len(pixels),
                           f"   {flops_per_image / 1e9:.1f} GFLOP/image, {flops_per_image * len(pixels) / seconds / 1e12:.3f} TFLOP/s")

    # -- the feature cache: one filling epoch (the warm-up), then epochs that only read it
    cache = feature_cache.open_feature_cache("train", items, cfg, model.backbone, n_views=1)
    cached_loader = rps.make_loader(items, cfg, train=True, device=device, sampler=rps.SeededEpochSampler(
        len(items), cfg.SEED, cfg.BATCH_SIZE, drop_last=True, n_views=1), cache=cache)
    cached_rate = report("cached", timed(training_epoch(model, cached_loader, cached_loader.sampler, cfg, device, cache),
                                         device, args.repeats), n_trained)
    entry_kb = cache.entry_bytes() / 1e3
    del model, loader, eval_loader, cached_loader

    slow_rate = None
    if not args.skip_slow:
        slow_cfg = SimpleNamespace(**vars(cfg))
        slow_cfg.AMP = "off"
        slow_model = rps.build_model(slow_cfg, device, attn_implementation="eager", truncate=False)
        slow_loader = rps.make_loader(items, slow_cfg, train=True, device=device, sampler=sampler)
        slow_rate = report("train-slow", timed(training_epoch(slow_model, slow_loader, sampler, slow_cfg, device), device,
                                               args.repeats), n_trained, "   (no mixed precision, eager attention, no truncation)")

    print(f"\npeak memory during training: {train_peak:.2f} GB ({'GPU allocated' if device.type == 'cuda' else 'CPU resident'})")
    print(f"feature cache: {entry_kb:.0f} kB per image and view (uint8 crop + CLS tokens)")
    if slow_rate:
        print(f"speed-up of the configured epoch over train-slow: {train_rate / slow_rate:.2f}x")
    print(f"speed-up of a cached epoch over an uncached one:   {cached_rate / train_rate:.2f}x")
    print(f"eval {eval_rate:.1f} images/s; backbone alone {backbone_rate:.1f} images/s")
    return dict(train=train_rate, eval=eval_rate, backbone=backbone_rate, cached=cached_rate, train_slow=slow_rate,
                backbone_tflops=flops_per_image * backbone_rate / 1e12, gflop_per_image=flops_per_image / 1e9,
                peak_memory_gb=train_peak, cache_entry_kb=entry_kb, precision=str(amp_dtype or "off"))


if __name__ == "__main__":
    main()
