"""The benchmark scripts run, print every figure the README quotes, and leave nothing behind.

Only the tiny architecture, one timed run: these check that the scripts work, not how fast
anything is (speed is never asserted in tests).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SMALL_HEAD = ["--proj-dim", "32", "--spec-channels", "16", "--fusion-dim", "32", "--fusion-heads", "4"]


def run_benchmark(name, args, tmp_path):
    # TMPDIR inside tmp_path, so the test can see whether the script cleaned up after itself.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    return result, scratch


def test_throughput_prints_every_rate_and_both_ratios_and_applies_script_options(tmp_path):
    result, scratch = run_benchmark("throughput.py", ["--arch", "tiny", "--images", "8", "--batch-size", "4",
                                                      "--repeats", "1", "--device", "cpu", *SMALL_HEAD], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label in ("train", "eval", "backbone", "cached", "train-slow"):
        assert re.search(rf"^{label}\s+[\d.]+ images/s", out, re.MULTILINE), (label, out)
    assert re.search(r"GFLOP/image, [\d.]+ TFLOP/s", out)
    assert re.search(r"speed-up of the configured epoch over train-slow: [\d.]+x", out)
    assert re.search(r"speed-up of a cached epoch over an uncached one: +[\d.]+x", out)
    assert re.search(r"feature cache: \d+ kB per image and view", out)
    assert "'SPEC_CHANNELS': 16" in out and "'PROJ_DIM': 32" in out  # the script's options reached the model
    assert list(scratch.iterdir()) == []  # the temporary backbone, images and cache are gone


def test_throughput_refuses_a_mistyped_script_option_in_one_line(tmp_path):
    result, _ = run_benchmark("throughput.py", ["--arch", "tiny", "--spec-chanels", "16"], tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "did you mean --spec-channels?" in result.stderr
    (tmp_path / "second").mkdir()
    result, _ = run_benchmark("throughput.py", ["--arch", "tiny", "--fusion-heads", "7"], tmp_path / "second")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: FUSION_HEADS=7 must divide FUSION_DIM=512."


def memory_rows(out):
    """rows: batch, head, backbone, total, what views would keep (GB) -> {batch: (total, views)}"""
    return {int(m[1]): (float(m[2]), float(m[3])) for m in re.finditer(
        r"^\s*(\d+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+\+([\d.]+)\s*$", out, re.MULTILINE)}


def test_memory_count_grows_with_the_batch_and_cleans_up(tmp_path):
    result, scratch = run_benchmark("memory_count.py", ["--arch", "tiny", "--batch-sizes", "2,8"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = memory_rows(result.stdout)
    assert set(rows) == {2, 8}, result.stdout
    assert rows[8][0] > rows[2][0]
    assert list(scratch.iterdir()) == []


def test_memory_count_of_tencrop_evaluation_counts_ten_crops_per_image(tmp_path):
    result, scratch = run_benchmark("memory_count.py", ["--arch", "tiny", "--batch-sizes", "2,8", "--tencrop"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "eval --tencrop" in result.stdout and "gradients + Adam 0.000 GB" in result.stdout
    rows = memory_rows(result.stdout)
    assert set(rows) == {2, 8}, result.stdout
    assert rows[8][0] > rows[2][0]
    assert list(scratch.iterdir()) == []


def test_the_largest_batch_search_doubles_then_bisects():
    sys.path.insert(0, str(BENCHMARKS))
    from gpu_check import largest_batch

    tried = []

    def fits_up_to(limit):
        return lambda batch: tried.append(batch) or batch <= limit
    assert largest_batch(fits_up_to(700), 128, 4096) == (640, False)  # within 1/8 of 700
    assert tried[:4] == [128, 256, 512, 1024]
    assert largest_batch(fits_up_to(5000), 128, 4096) == (4096, True)
    assert largest_batch(fits_up_to(100), 128, 4096) == (96, False)  # below the start: bisected down, within 1/8
    assert largest_batch(fits_up_to(0), 128, 4096) == (0, False)


def test_gpu_check_quick_on_the_cpu_writes_both_reports_with_every_section(tmp_path):
    result, scratch = run_benchmark("gpu_check.py", ["--device", "cpu", "--quick", "--out", str(tmp_path / "out")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert set(report) >= {"machine", "settings", "throughput", "memory", "data_loading", "heatmaps", "end_to_end", "seconds"}
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["gpu"] is None
    for precision in ("bf16", "fp16"):
        row = report["throughput"][precision]
        for key in ("train", "eval", "cached", "backbone", "backbone_tflops", "peak_memory_gb"):
            assert row[key] > 0, (precision, key)
    assert report["throughput"]["fp16"]["precision"] == "torch.float16"
    assert report["throughput"]["compiled"]["train"] > 0
    assert "CUDA" in report["memory"]["note"]  # the caps are skipped on the CPU
    for images in ("png_256", "jpeg_1024"):
        assert report["data_loading"][images]["2"]["images_per_s"] > 0
    run = report["end_to_end"]
    assert run["checkpoint_written"], run
    assert run["exited_by_itself"] and run["exit_code"] == 0, run  # a run that hangs at exit fails here
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    for heading in ("## Throughput", "## Memory of a training step", "## Data loading", "## Heatmaps", "## End-to-end training run"):
        assert heading in markdown
    for method in ("spectral tokens", "windows"):
        assert report["heatmaps"][method]["seconds_per_image"] > 0
        assert re.search(rf"\| {method} \| [\d.]+ \| - \|", markdown), method
    assert re.search(r"\| fp16 \+ GradScaler \| [\d.]+ \| [\d.]+ \|", markdown)
    assert re.search(r"\| jpeg 1024 px \| [\d.]+", markdown)
    assert list(scratch.iterdir()) == []


def test_localisation_prints_pointing_and_pixel_scores_per_method_and_generator_a_deletion_test_and_the_reach(demo, tmp_path):
    cwd, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    methods = ["spectral tokens", "untrained tokens", "low HF energy", "random"]
    result, scratch = run_benchmark("localisation.py", ["--ckpt", cwd / "checkpoints/demo/best_rine_plus_ssca.pth", "--n", "3",
                                                        "--deletion-n", "1", "--methods", ",".join(methods)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(m[1].strip(), m[2]): [float(v) for v in m.group(3, 4, 5)] for m in re.finditer(
        r"^(\S.*?)\s+(bilinear|nearest|transposed_conv|real)\s+(\d\.\d\d)\s+(\d\.\d{3})\s+(\d\.\d{3})\s+\d+$",
        result.stdout, re.MULTILINE)}
    assert set(rows) == {(m, g) for m in methods for g in ("bilinear", "nearest", "transposed_conv", "real")}, result.stdout
    assert all(0.0 <= v <= 1.0 for scores in rows.values() for v in scores)
    deletion = re.findall(r"^  (bilinear|nearest|transposed_conv)\s+(spectral tokens|low HF energy|random)((?:\s+-?\d+\.\d\d){5})$",
                          result.stdout, re.MULTILINE)
    assert len(deletion) == 9, result.stdout
    assert re.search(r"centre cell: half-side holding 90% of \|gradient\|: [\d.]+$", result.stdout, re.MULTILINE)
    assert "corner cell (0, 0): share of |gradient| in the opposite quarter: " in result.stdout
    assert list(scratch.iterdir()) == []


def test_rine_scoring_precision_prints_each_comparison(tmp_path):
    result, scratch = run_benchmark("rine_scoring_precision.py", ["--arch", "tiny", "--n-images", "6", "--threads", "1"],
                                    tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for dtype in ("float16", "bfloat16", "float32"):
        assert re.search(rf"^backbone {dtype}: 6 images in \d+ s; logits from", out, re.MULTILINE), (dtype, out)
    for pair in ("float16 vs bfloat16", "float16 vs float32", "bfloat16 vs float32"):
        assert re.search(rf"backbone {pair}: max \|dP\| [\d.e+-]+, mean [\d.e+-]+; AP [\d.]+ vs [\d.]+", out), (pair, out)
    assert re.search(r"logits as they are: max \|dP\| .*P\(fake\) exactly 1.0 in float32: \d+, in float64: \d+; AP", out)
    assert re.search(r"logits x [\d.]+ \(max \|logit\| 30.0\): max \|dP\|", out)
    assert list(scratch.iterdir()) == []
