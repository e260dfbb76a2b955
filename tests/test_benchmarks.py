"""The benchmark scripts run, print every figure the README quotes, and leave nothing behind.

Only the tiny architecture, one timed run: these check that the scripts work, not how fast
anything is (speed is never asserted in tests).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

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


def test_memory_count_grows_with_the_batch_and_cleans_up(tmp_path):
    result, scratch = run_benchmark("memory_count.py", ["--arch", "tiny", "--batch-sizes", "2,8"], tmp_path)
    assert result.returncode == 0, result.stderr
    # rows: batch, head saved, backbone, total (GB)
    totals = {int(m[1]): float(m[2]) for m in re.finditer(
        r"^\s*(\d+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s*$", result.stdout, re.MULTILINE)}
    assert set(totals) == {2, 8}, result.stdout
    assert totals[8] > totals[2]
    assert list(scratch.iterdir()) == []
