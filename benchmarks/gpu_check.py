"""One command that checks rine_plus_ssca.py on a CUDA GPU: speed, memory, data loading, a run that ends.

    python benchmarks/gpu_check.py                          # one CUDA GPU: a few minutes, nothing downloaded
    python benchmarks/gpu_check.py --device cpu --quick     # tiny sizes on the CPU (what the tests run)

Everything runs on random weights with ViT-L/14's architecture (built from a CLIPVisionConfig, as
benchmarks/throughput.py does) and on generated images in a temporary folder, removed afterwards.
It writes gpu_check.md and gpu_check.json (to --out) with:
  machine        the GPU, its compute capability and memory, torch / CUDA / cuDNN versions
  throughput     images/s of a training epoch, scoring, a cached epoch and the backbone alone
                 (with its TFLOP/s) at batch 128, in bf16 and in fp16 with a GradScaler, and a
                 training epoch with torch.compile (COMPILE) in the precision AMP=auto picks
  memory         peak memory of a batch-128 training step under a 24 GiB and a 16 GiB cap
                 (torch.cuda.set_per_process_memory_fraction; the whole GPU where it has less), and
                 the largest batch that fits under each (doubling from 128, then bisection to within
                 1/8, catching OOM)
  data_loading   training views/s of the DataLoader with 2, 4 and 8 workers, for 256 px PNGs and
                 1024 px JPEGs, and whether its batches arrive pinned
  heatmaps       seconds per image of `explain` (predict --explain): spectral tokens (the default
                 model) and mirror-tiled windows (USE_SPECTRAL=False), with their peak memory
  end_to_end     a training run through the command line on generated data, in a subprocess with
                 a time limit: it must write its checkpoint and exit by itself
On the CPU the memory caps are skipped (they are CUDA's).
"""

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import rine_plus_ssca as rps  # noqa: E402
from rine_plus_ssca_tools import heatmaps  # noqa: E402
import throughput  # noqa: E402

SCRIPT = Path(rps.__file__).resolve()

# --quick compiles with the aot_eager backend: the same tracing, without inductor's minutes of C++ builds on a CPU.
FULL = SimpleNamespace(arch="vitl", batch_size=128, images=256, repeats=2, head={}, compile_backend="inductor",
                       memory_caps_gb=(24, 16),
                       batch_limit=4096, worker_counts=(2, 4, 8), loader_images=512, loader_batch=32, distinct_images=8,
                       run_images=(32, 16), run_batch=8, run_timeout=240, heatmap_images=8)
QUICK = SimpleNamespace(arch="tiny", batch_size=4, images=8, repeats=1,
                        head=dict(PROJ_DIM=32, SPEC_CHANNELS=16, FUSION_DIM=32, FUSION_HEADS=4), compile_backend="aot_eager",
                        memory_caps_gb=(24, 16), batch_limit=64, worker_counts=(2,), loader_images=16, loader_batch=8,
                        distinct_images=2, run_images=(8, 4), run_batch=4, run_timeout=180, heatmap_images=2)


def machine_description(device):
    description = dict(device=str(device), torch=torch.__version__, cpu_cores=os.cpu_count())
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        description.update(gpu=properties.name, compute_capability=".".join(map(str, (properties.major, properties.minor))),
                           gpu_memory_gb=round(properties.total_memory / 1e9, 1), cuda=torch.version.cuda,
                           cudnn=torch.backends.cudnn.version())
    else:
        description.update(gpu=None, cuda=torch.version.cuda)
    return description


def base_config(settings, work, device):
    cfg = rps.default_config()
    cfg.__dict__.update(settings.head)
    cfg.CLIP_MODEL, cfg.DEVICE = str(work / "backbone"), str(device)
    return cfg


# ----------------------------------------------------------------------------- throughput


def measure_throughput(settings, device, work):
    """throughput.py's figures at the check's batch size, in bf16 and in fp16 (+ GradScaler), and compiled."""
    results = {}
    for precision in ("bf16", "fp16"):
        cfg = base_config(settings, work, device)
        cfg.AMP = precision
        args = SimpleNamespace(arch=settings.arch, images=settings.images, batch_size=settings.batch_size,
                               device=str(device), repeats=settings.repeats, num_workers=0, skip_slow=True)
        print(f"\n== throughput, {precision}" + (" + GradScaler" if precision == "fp16" else ""), flush=True)
        results[precision] = throughput.measure(args, cfg, {"AMP": precision}, work)
        release_memory(device)

    cfg = base_config(settings, work, device)
    cfg.BATCH_SIZE, cfg.NUM_WORKERS, cfg.COMPILE = settings.batch_size, 0, True
    items = throughput.make_images(work / "images", settings.images)
    model = rps.build_model(cfg, device)
    sampler = rps.SeededEpochSampler(len(items), cfg.SEED, cfg.BATCH_SIZE, drop_last=True)
    loader = rps.make_loader(items, cfg, train=True, device=device, sampler=sampler)
    compiled = torch.compile(model, backend=settings.compile_backend)
    epoch = throughput.training_epoch(model, loader, sampler, cfg, device, step_model=compiled)
    print(f"\n== throughput, torch.compile, backend {settings.compile_backend} (the first, compiling epoch is the "
          "untimed warm-up)", flush=True)
    seconds = throughput.timed(epoch, device, settings.repeats)
    results["compiled"] = dict(train=sampler.batches_per_epoch() * cfg.BATCH_SIZE / seconds, backend=settings.compile_backend,
                               precision=str(rps.resolve_amp_dtype(cfg.AMP, device) or "off"))
    print(f"train, compiled {results['compiled']['train']:.2f} images/s", flush=True)
    del model, loader
    release_memory(device)
    return results


# ----------------------------------------------------------------------------- heatmaps


def measure_heatmaps(settings, device, work):
    """Seconds per image of explain() for both methods, after one warm-up image, and the peak memory."""
    images = [Image.fromarray(rps.make_demo_image(np.random.default_rng(i), i % 2 == 1)) for i in range(settings.heatmap_images)]
    results = {}
    for method, spectral in (("spectral tokens", True), ("windows", False)):
        cfg = base_config(settings, work, device)
        cfg.USE_SPECTRAL = spectral
        model = rps.build_model(cfg, device).eval()
        heatmaps.explain(model, images[:1])  # warm-up: kernels chosen, memory allocated
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        explanations = heatmaps.explain(model, images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - started) / len(images)
        assert explanations[0].method == method
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        results[method] = dict(seconds_per_image=seconds, peak_memory_gb=peak)
        print(f"heatmaps, {method}: {seconds:.3f} s/image", flush=True)
        del model
        release_memory(device)
    return results


# ----------------------------------------------------------------------------- memory


def release_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(fits, start, limit):
    """The largest batch size for which fits(batch) is True: double from start, then bisect to within 1/8.

    Returns (batch, reached_limit). Assumes that what does not fit at some size does not fit above it.
    """
    low, high, batch = 0, None, start
    while high is None:
        if batch > limit:
            return low, True
        if fits(batch):
            low, batch = batch, batch * 2
        else:
            high = batch
    while high - low > max(1, low // 8):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, False


def synthetic_batch(batch_size, device, crop):
    pixels = torch.randint(0, 256, (batch_size, 3, crop, crop), dtype=torch.uint8, device=device)
    labels = (torch.arange(batch_size, device=device) % 2).float()
    return rps.Batch(pixels, labels, torch.arange(batch_size), torch.zeros(batch_size, dtype=torch.long),
                     tokens=None, cached=torch.zeros(batch_size, dtype=torch.bool), bad=[])


def training_step_peak_gb(model, cfg, device, batch_size):
    """Peak GPU memory (GB) of one training step (Adam's state included), or None when it runs out of memory."""
    learner = rps.make_learner(model, cfg, rps.OneProcess(device))
    model.train()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        batch = synthetic_batch(batch_size, device, cfg.CROP_SIZE)
        rps.training_step(learner, batch, cfg)
        rps.update_weights(learner)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 1e9
    except torch.cuda.OutOfMemoryError:
        return None
    except RuntimeError as error:  # cuBLAS/cuDNN report a failed workspace allocation in their own words
        if "ALLOC_FAILED" in str(error) or "out of memory" in str(error):
            return None
        raise
    finally:
        del learner
        model.zero_grad(set_to_none=True)
        release_memory(device)


def measure_memory(settings, device, work):
    """Peak memory of a training step at the check's batch size and the largest batch, under each cap."""
    if device.type != "cuda":
        return dict(note="memory caps are CUDA's; skipped on the CPU")
    cfg = base_config(settings, work, device)
    model = rps.build_model(cfg, device)
    total = torch.cuda.get_device_properties(device).total_memory
    results = {}
    for cap_gb in settings.memory_caps_gb:
        # A "16 GB" card has a little less than 16 GiB usable: then the cap is the whole GPU.
        fraction = min(1.0, cap_gb * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        try:
            peak = training_step_peak_gb(model, cfg, device, settings.batch_size)
            batch, at_limit = largest_batch(lambda b: training_step_peak_gb(model, cfg, device, b) is not None,
                                            settings.batch_size, settings.batch_limit)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        results[f"{cap_gb}GiB"] = dict(peak_gb_at_batch=peak, largest_batch=batch, search_limit_reached=at_limit,
                                      cap_gb=round(fraction * total / 2**30, 1))
        print(f"cap {cap_gb} GiB: batch {settings.batch_size} peaks at "
              f"{'OOM' if peak is None else f'{peak:.2f} GB'}; largest batch {batch}{'+' if at_limit else ''}", flush=True)
    del model
    release_memory(device)
    return results


# ----------------------------------------------------------------------------- data loading


def make_image_files(folder, n_images, size, suffix, distinct):
    """n_images files of generated size x size images: `distinct` ones, copied (making a 1024 px one takes ~1 s)."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n_images):
        path = folder / f"{i:04d}{suffix}"
        if i < distinct:
            Image.fromarray(rps.make_demo_image(rng, i % 2 == 1, "bilinear", size)).save(path, quality=90)
        else:
            shutil.copyfile(folder / f"{i % distinct:04d}{suffix}", path)
        items.append((str(path), i % 2, "."))
    return items


def measure_data_loading(settings, device, work):
    """Training views/s of make_loader's DataLoader: the second epoch, so worker start-up is not counted."""
    image_sets = {"png_256": make_image_files(work / "png_256", settings.loader_images, 256, ".png", settings.distinct_images),
                  "jpeg_1024": make_image_files(work / "jpeg_1024", settings.loader_images, 1024, ".jpg",
                                                settings.distinct_images)}
    results = {}
    for name, items in image_sets.items():
        results[name] = {}
        for workers in settings.worker_counts:
            cfg = rps.default_config()
            cfg.BATCH_SIZE, cfg.NUM_WORKERS = settings.loader_batch, workers
            sampler = rps.SeededEpochSampler(len(items), cfg.SEED, cfg.BATCH_SIZE, drop_last=True)
            loader = rps.make_loader(items, cfg, train=True, device=device, sampler=sampler)
            pinned = []

            def epoch():
                for batch in loader:
                    pinned.append(batch.pixels.is_pinned())
            seconds = throughput.timed(epoch, torch.device("cpu"), 1)
            rate = sampler.batches_per_epoch() * cfg.BATCH_SIZE / seconds
            results[name][str(workers)] = dict(images_per_s=rate, workers_used=loader.num_workers, pinned=all(pinned))
            print(f"{name}: {workers} workers ({loader.num_workers} used) {rate:.1f} views/s, pinned: {all(pinned)}",
                  flush=True)
            del loader
    return results


# ----------------------------------------------------------------------------- end to end


def run_end_to_end(settings, device, work):
    """`python rine_plus_ssca.py ...` on generated data; it has to finish and exit by itself."""
    n_train, n_val = settings.run_images
    throughput.make_images(work / "run_data" / "train", n_train)
    throughput.make_images(work / "run_data" / "val", n_val)
    options = [f"--{name.lower().replace('_', '-')}={value}" for name, value in settings.head.items()]
    command = [sys.executable, str(SCRIPT), "--clip-model", str(work / "backbone"), "--data-dir", str(work / "run_data"),
               "--checkpoint-dir", str(work / "run_checkpoints"), "--epochs", "1", "--batch-size", str(settings.run_batch),
               "--num-workers", "2", "--device", str(device), *options]
    started = time.perf_counter()
    with open(work / "run_output.txt", "w") as output:
        # Its own process group, so that a run that does not end is killed together with its data workers.
        run = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = run.wait(timeout=settings.run_timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if run.poll() is None:  # it did not end in time, or this check was interrupted: stop it and its workers
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    seconds = time.perf_counter() - started
    tail = (work / "run_output.txt").read_text(errors="replace").strip().splitlines()[-3:]
    result = dict(exit_code=code, seconds=seconds, exited_by_itself=code is not None,
                  checkpoint_written=(work / "run_checkpoints" / rps.BEST_NAME).exists(), output_tail=tail,
                  command="python rine_plus_ssca.py " + " ".join(command[2:]))
    print(f"end-to-end run: exit code {code} after {seconds:.0f} s, checkpoint written: {result['checkpoint_written']}",
          flush=True)
    return result


# ----------------------------------------------------------------------------- report


def _number(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_report(report):
    machine = report["machine"]
    lines = ["# gpu_check report", ""]
    if machine["gpu"]:
        lines.append(f"GPU: **{machine['gpu']}** (compute capability {machine['compute_capability']}, "
                     f"{machine['gpu_memory_gb']} GB); torch {machine['torch']}, CUDA {machine['cuda']}, "
                     f"cuDNN {machine['cudnn']}; {machine['cpu_cores']} CPU cores.")
    else:
        lines.append(f"No GPU: device {machine['device']}, {machine['cpu_cores']} CPU cores; torch {machine['torch']}.")
    settings = report["settings"]
    lines += ["", f"Architecture {settings['arch']} (random weights), batch {settings['batch_size']}, "
              f"{settings['images']} images, median of {settings['repeats']} after a warm-up; {report['seconds']:.0f} s in all ("
              + ", ".join(f"{name.replace('_', ' ')} {seconds:.0f} s" for name, seconds in report["section_seconds"].items())
              + ").",
              "", "## Throughput (images/s)", "",
              "| precision | train | eval | cached epoch | backbone | backbone TFLOP/s | peak memory (GB) |",
              "|---|---|---|---|---|---|---|"]
    for precision, label in (("bf16", "bf16"), ("fp16", "fp16 + GradScaler")):
        row = report["throughput"][precision]
        lines.append(f"| {label} | {_number(row['train'])} | {_number(row['eval'])} | {_number(row['cached'])} | "
                     f"{_number(row['backbone'])} | {_number(row['backbone_tflops'], 3)} | {_number(row['peak_memory_gb'], 2)} |")
    compiled = report["throughput"]["compiled"]
    lines += ["", f"Training with torch.compile (backend {compiled['backend']}, {compiled['precision']}): "
              f"{_number(compiled['train'])} images/s.",
              "", "## Memory of a training step", ""]
    memory = report["memory"]
    if "note" in memory:
        lines.append(memory["note"] + ".")
    else:
        lines += [f"| cap (GiB) | peak at batch {settings['batch_size']} (GB allocated) | largest batch that fits |",
                  "|---|---|---|"]
        for row in memory.values():
            peak = "out of memory" if row["peak_gb_at_batch"] is None else _number(row["peak_gb_at_batch"], 2)
            largest = f"{row['largest_batch']}{' (search limit)' if row['search_limit_reached'] else ''}"
            lines.append(f"| {row['cap_gb']} | {peak} | {largest} |")
    loading = report["data_loading"]
    workers = list(next(iter(loading.values())))
    lines += ["", "## Data loading (training views/s)", "",
              "| images | " + " | ".join(f"{w} workers" for w in workers) + " |", "|---|" + "---|" * len(workers)]
    for name, rows in loading.items():
        cells = [f"{_number(rows[w]['images_per_s'])}" + (f" ({rows[w]['workers_used']} used)"
                 if rows[w]["workers_used"] != int(w) else "") for w in workers]
        lines.append(f"| {name.replace('_', ' ')} px | " + " | ".join(cells) + " |")
    pinned = all(row["pinned"] for rows in loading.values() for row in rows.values())
    lines += ["", f"Batches arrive pinned: {'yes' if pinned else 'no'}" + ("" if machine["gpu"] else " (pinning is for GPUs)") + "."]
    lines += ["", f"## Heatmaps (`predict --explain`, {settings['heatmap_images']} images of 256 px)", "",
              "| method | s/image | peak memory (GB) |", "|---|---|---|"]
    for method, row in report["heatmaps"].items():
        peak = "-" if row["peak_memory_gb"] is None else _number(row["peak_memory_gb"], 2)
        lines.append(f"| {method} | {_number(row['seconds_per_image'], 3)} | {peak} |")
    run = report["end_to_end"]
    lines += ["", "## End-to-end training run", "", f"`{run['command']}`", "",
              f"Exit code {run['exit_code']} after {run['seconds']:.0f} s; exited by itself: "
              f"{'yes' if run['exited_by_itself'] else 'NO (killed at the time limit)'}; checkpoint written: "
              f"{'yes' if run['checkpoint_written'] else 'no'}.", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, ... or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny backbone and sizes (seconds; for the tests)")
    parser.add_argument("--out", default=".", help="folder for gpu_check.md and gpu_check.json")
    args = parser.parse_args()
    try:
        device = rps.resolve_device(args.device)
    except rps.UserError as error:
        sys.exit(f"error: {error}")
    settings = QUICK if args.quick else FULL
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    report = dict(machine=machine_description(device), settings=dict(vars(settings), quick=args.quick))
    with tempfile.TemporaryDirectory(prefix="rps_gpu_check_") as folder:  # removed afterwards: the backbone is 1.2 GB
        work = Path(folder)
        throughput.make_backbone(settings.arch, work / "backbone")
        report["section_seconds"] = {"backbone": time.perf_counter() - started}
        for name, check in (("throughput", measure_throughput), ("memory", measure_memory),
                            ("data_loading", measure_data_loading), ("heatmaps", measure_heatmaps),
                            ("end_to_end", run_end_to_end)):
            section_started = time.perf_counter()
            report[name] = check(settings, device, work)
            report["section_seconds"][name] = time.perf_counter() - section_started
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown_report(report))
    print(f"\nwrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
