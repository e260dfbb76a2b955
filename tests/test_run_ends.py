"""Every run ends: success, a crash, Ctrl-C and SIGTERM to the whole process group, under torchrun too.

Each run is a subprocess in its own session (its own process group, as a terminal job or a batch job
is), with two data-worker processes. A run must leave within 30 s of the moment it is done (its
`main` returned or raised, or it got the signal), and leave no process of its group behind. The
moments are not guessed by polling: a small wrapper around the script writes a marker file at them,
and a run waiting for a signal holds its training step until the signal has arrived.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rine_plus_ssca as rps
from rine_plus_ssca_tools.distributed import TorchrunProcesses
from conftest import REPO, run_script, write_demo_tree

EXIT_WITHIN_S = 30  # after the moment a run is done, it must be gone within this
GUARD_S = 600  # how long to wait for a marker: a guard against a broken test, not a timing assertion
WORKERS = ["--num-workers", "2"]
# 2 x 8 images per class, batch 8: 4 steps per epoch.
LAYOUT = {"train": {"nearest": 8, "bilinear": 8}, "val": {"nearest": 2, "bilinear": 2}}

# Wraps the script: MODE=raise makes training step AT raise; MODE=wait_for_signal holds step AT (in process
# RANK only) until a stop signal has arrived, after writing MARKER.step; MARKER.done is written once main()
# has returned or raised, i.e. when only the interpreter's exit is left.
WRAPPER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    import rine_plus_ssca as rps

    mode, at = os.environ["RUN_ENDS_MODE"], int(os.environ.get("RUN_ENDS_AT", "3"))
    marker = os.environ["RUN_ENDS_MARKER"]
    waiting_rank = os.environ.get("RUN_ENDS_RANK", "0")
    calls, signals = [0], []
    real_step, real_handle = rps.training_step, rps.GracefulStop._handle

    def handle(self, signum, frame):
        signals.append(signum)
        real_handle(self, signum, frame)

    def step(*args, **kwargs):
        calls[0] += 1
        if mode == "raise" and calls[0] == at:
            raise RuntimeError(f"planted failure in training step {{at}}")
        result = real_step(*args, **kwargs)
        if mode == "wait_for_signal" and calls[0] == at and os.environ.get("RANK", "0") == waiting_rank:
            Path(marker + ".step").write_text(str(os.getpid()))
            deadline = time.monotonic() + {guard}
            while not signals and time.monotonic() < deadline:
                time.sleep(0.01)
        return result

    rps.GracefulStop._handle = handle
    rps.training_step = step
    try:
        code = rps.main(sys.argv[1:])
    finally:
        if os.environ.get("RANK", "0") == "0":
            Path(marker + ".done").write_text("main returned")
    sys.exit(code)
""").format(repo=str(REPO), guard=GUARD_S)

# A loader with persistent workers, iterated once and still referenced when the interpreter exits.
LOADER_ALIVE_AT_EXIT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    import torch
    import rine_plus_ssca as rps

    loader = torch.utils.data.DataLoader(range(100), num_workers=2, persistent_workers=True,
                                         worker_init_fn=rps._worker_ignores_stop_signals)
    assert sum(int(x) for x in loader) == 4950
    Path(sys.argv[1]).write_text("iterated")
""").format(repo=str(REPO))


def env_one_thread(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
                **{k: str(v) for k, v in extra.items()})


def tiny_args(tree, backbone, checkpoint_dir, *extra):
    return ["--batch-size", "8", "--proj-dim", "32", "--spec-channels", "16", "--fusion-dim", "32", "--fusion-heads",
            "4", "--device", "cpu", "--amp", "off", "--clip-model", backbone, "--data-dir", tree,
            "--checkpoint-dir", checkpoint_dir, *WORKERS, *map(str, extra)]


class Run:
    """A command in its own session, output in files; `group` is its process group id."""

    def __init__(self, command, folder, name, **env):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.marker = str(self.folder / name)
        self.out, self.err = open(self.folder / f"{name}.out", "w"), open(self.folder / f"{name}.err", "w")
        self.process = subprocess.Popen(command, cwd=folder, stdout=self.out, stderr=self.err, start_new_session=True,
                                        env=env_one_thread(RUN_ENDS_MARKER=self.marker, **env))
        self.group = self.process.pid

    def wait_for_marker(self, suffix):
        path = Path(self.marker + suffix)
        deadline = time.monotonic() + GUARD_S
        while not path.exists():
            if self.process.poll() is not None:
                self.fail(f"ended (exit {self.process.returncode}) before writing {path.name}")
            if time.monotonic() > deadline:
                self.fail(f"no {path.name} after {GUARD_S} s")
            time.sleep(0.05)
        return path.read_text()

    def must_exit(self, moment):
        """The exit code, once the process has left within EXIT_WITHIN_S; fails (and kills the group) otherwise."""
        try:
            self.process.wait(timeout=EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.fail(f"still running {EXIT_WITHIN_S} s after {moment}")
        # Its worker processes are gone too (zombies not yet reaped by init are not running).
        deadline = time.monotonic() + EXIT_WITHIN_S
        while group_members(self.group) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = group_members(self.group)
        if left:
            self.fail(f"left processes behind after {moment}: {left}")
        return self.process.returncode

    def output(self):
        self.out.flush()
        self.err.flush()
        return (Path(self.out.name).read_text(), Path(self.err.name).read_text())

    def fail(self, what):
        self.kill()
        stdout, stderr = self.output()
        pytest.fail(f"{what}\n--- stdout\n{stdout[-2000:]}\n--- stderr\n{stderr[-3000:]}")

    def kill(self):
        try:
            os.killpg(self.group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def group_members(group):
    """{pid: command} of the live (not zombie) processes in a process group, read from /proc."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) ": state, ppid, pgrp, ...
        if int(fields[2]) == group and fields[0] != "Z":
            members[int(entry.name)] = command[:120]
    return members


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_demo_tree(tmp_path_factory.mktemp("run_ends_tree") / "data", LAYOUT, seed=5)


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory):
    path = tmp_path_factory.mktemp("wrapper") / "wrapped_rine_plus_ssca.py"
    path.write_text(WRAPPER)
    return path


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# =========================================================================== a. an exception in a training step

def test_an_exception_in_a_training_step_ends_the_run(tree, wrapper, tiny_backbone, tmp_path):
    run = Run([sys.executable, str(wrapper), *tiny_args(tree, tiny_backbone, tmp_path / "ckpt")], tmp_path, "crash",
              RUN_ENDS_MODE="raise", RUN_ENDS_AT=3)
    run.wait_for_marker(".done")
    returncode = run.must_exit("main() raised")
    stdout, stderr = run.output()
    assert returncode not in (0, 130), stderr[-3000:]
    assert "RuntimeError: planted failure in training step 3" in stderr, stderr[-3000:]


# =========================================================================== b. a loader alive at exit

def test_a_loader_with_persistent_workers_alive_at_exit_lets_python_exit(tmp_path):
    script = tmp_path / "loader_alive_at_exit.py"
    script.write_text(LOADER_ALIVE_AT_EXIT)
    run = Run([sys.executable, str(script), str(tmp_path / "iterated")], tmp_path, "loader")
    deadline = time.monotonic() + GUARD_S
    while not (tmp_path / "iterated").exists() and run.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "iterated").exists(), run.output()
    assert run.must_exit("the script's last line") == 0, run.output()


# =========================================================================== c. a successful run

def test_successful_runs_with_workers_exit_every_time(tree, wrapper, tiny_backbone, tmp_path):
    """Three runs side by side (a busy machine is where the exit used to hang now and then)."""
    runs = [Run([sys.executable, str(wrapper), *tiny_args(tree, tiny_backbone, tmp_path / f"ckpt{i}", "--epochs", "1")],
                tmp_path, f"run{i}", RUN_ENDS_MODE="plain") for i in range(3)]
    try:
        for run in runs:
            run.wait_for_marker(".done")
            assert run.must_exit("main() returned") == 0, run.output()
            assert (run.folder / f"ckpt{runs.index(run)}" / rps.BEST_NAME).is_file()
    finally:
        for run in runs:
            if run.process.poll() is None:
                run.kill()


# =========================================================================== d. Ctrl-C and SIGTERM to the group

@pytest.fixture(scope="module")
def group_signalled(tree, wrapper, tiny_backbone, tmp_path_factory):
    """A SIGINT run and a SIGTERM run (2 epochs of 4 steps), each signalled as a group during step 3."""
    root = tmp_path_factory.mktemp("group_signals")
    runs = {sig: Run([sys.executable, str(wrapper), *tiny_args(tree, tiny_backbone, root / sig.name / "ckpt",
                                                                 "--epochs", "2", "--seed", "0")],
                     root / sig.name, "run", RUN_ENDS_MODE="wait_for_signal", RUN_ENDS_AT=3)
            for sig in (signal.SIGINT, signal.SIGTERM)}
    results = {}
    try:
        for sig, run in runs.items():
            run.wait_for_marker(".step")
            os.killpg(run.group, sig)  # to the main process and its workers, as a terminal or a scheduler sends it
        for sig, run in runs.items():
            returncode = run.must_exit(f"{sig.name} to the process group")
            results[sig] = (returncode, *run.output(), run.folder)
    finally:
        for run in runs.values():
            if run.process.poll() is None:
                run.kill()
    return results


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_group_saves_the_exact_step_and_exits(group_signalled, sig, code, name, tiny_backbone, tree):
    returncode, stdout, stderr, folder = group_signalled[sig]
    assert returncode == code, stderr[-3000:]
    assert "Traceback" not in stdout + stderr and "error:" not in stderr, stderr[-3000:]
    last = folder / "ckpt" / rps.LAST_NAME
    assert f"Interrupted by {name} at epoch 1, step 3; saved {last}. Continue with --resume." in stderr
    assert (load(last)["resume"]["epoch"], load(last)["resume"]["step"]) == (1, 3)

    resumed = run_script(tiny_args(tree, tiny_backbone, "ckpt", "--epochs", "2", "--seed", "0", "--resume"), cwd=folder,
                         timeout=GUARD_S, env_extra={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming from ckpt/last_rine_plus_ssca.pth: epoch 1, after step 3" in resumed.stdout
    state = load(last)
    assert [m["epoch"] for m in state["history"]] == [1, 2]
    assert (state["resume"]["epoch"], state["resume"]["step"]) == (3, 0)


# =========================================================================== e. torchrun: one process is signalled

def test_under_torchrun_a_stop_seen_by_one_process_stops_both(tree, wrapper, tiny_backbone, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(wrapper), *tiny_args(tree, tiny_backbone, tmp_path / "ckpt", "--epochs", "2", "--seed", "0")]
    run = Run(command, tmp_path, "torchrun", RUN_ENDS_MODE="wait_for_signal", RUN_ENDS_AT=3, RUN_ENDS_RANK=1)
    try:
        rank_1 = int(run.wait_for_marker(".step"))
        os.kill(rank_1, signal.SIGTERM)  # process 1 alone; process 0 must learn of it and stop at the same step
        returncode = run.must_exit("SIGTERM to process 1")
    finally:
        if run.process.poll() is None:
            run.kill()
    stdout, stderr = run.output()
    assert returncode != 0  # torchrun reports its processes' exit code 143 as a failure
    assert "x 2 processes" in stdout
    # Both processes stopped at the step where process 1 was signalled: each says so, process 0 saved it.
    stops = re.findall(r"Interrupted by SIGTERM at epoch 1, step 3; saved \S+\. Continue with --resume\.", stderr)
    assert len(stops) == 2, stderr[-3000:]
    resume = load(tmp_path / "ckpt" / rps.LAST_NAME)["resume"]
    assert (resume["epoch"], resume["step"]) == (1, 3)
    assert re.search(r"exitcode\s*:\s*143", stderr), stderr[-3000:]


# =========================================================================== the joint decisions, in-process

def _joint_decisions(rank, init_file, results):
    """One of two gloo processes: rank 0 saw 2 unreadable images of 10, rank 1 none but a SIGTERM."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    outcome = {}
    try:
        procs = TorchrunProcesses(rank, 2, torch.device("cpu"), dist.group.WORLD)
        log = rps.BadImageLog("training", [f"img{i}.png" for i in range(10)], max_fraction=0.15)
        stop = rps.GracefulStop()
        if rank == 0:
            log.add([(3, "truncated"), (7, "empty")], write=lambda line: None)
        else:
            stop.requested = signal.SIGTERM
        try:
            rps.end_run_if_asked([], procs, stop)
        except KeyboardInterrupt:
            outcome["stop"] = int(stop.requested)
        try:
            rps.end_run_if_asked([log], procs)
        except rps.UserError as error:
            outcome["bad"] = str(error)
    finally:
        dist.destroy_process_group()
    results.put((rank, outcome))


def in_two_gloo_processes(target, tmp_path):
    """{rank: outcome} of target(rank, init_file, results) run in two spawned processes joined by gloo."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=target, args=(rank, tmp_path / "init", results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    try:
        return dict(results.get(timeout=GUARD_S) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=EXIT_WITHIN_S)
            if process.is_alive():
                process.kill()


def test_processes_agree_on_stopping_and_on_too_many_unreadable_images(tmp_path):
    outcomes = in_two_gloo_processes(_joint_decisions, tmp_path)
    for rank in (0, 1):
        assert outcomes[rank]["stop"] == signal.SIGTERM, outcomes  # rank 0 got no signal, yet stops as rank 1 does
        assert outcomes[rank]["bad"].startswith("2 of 10 training images are unreadable"), outcomes
        assert "img3.png; img7.png" in outcomes[rank]["bad"]


# =========================================================================== a step skipped by all or none; dropout per process

def _one_process_without_images(rank, init_file, results):
    """One of two gloo processes: rank 1's whole share of the batch was unreadable."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        procs = TorchrunProcesses(rank, 2, torch.device("cpu"), dist.group.WORLD)
        take_step = procs.all_have(rank == 0)
        procs.seed_dropout(3, 1, 0)
        mask = torch.nn.functional.dropout(torch.ones(64), 0.5, training=True) > 0
    finally:
        dist.destroy_process_group()
    results.put((rank, (take_step, mask.tolist())))


def test_processes_skip_a_step_together_and_draw_their_own_dropout_masks(tmp_path):
    outcomes = in_two_gloo_processes(_one_process_without_images, tmp_path)
    assert outcomes[0][0] is False and outcomes[1][0] is False  # rank 0 had images, yet skips with rank 1
    assert outcomes[0][1] != outcomes[1][1]  # each process its own dropout mask


def test_one_process_keeps_seeds_dropout_stream():
    torch.manual_seed(5)
    expected = torch.rand(8)
    torch.manual_seed(5)
    one = rps.join_processes(SimpleNamespace(DEVICE="cpu"))  # without torchrun's WORLD_SIZE: one process
    assert isinstance(one, rps.OneProcess) and (one.rank, one.world_size) == (0, 1)
    one.seed_dropout(5, 1, 0)
    assert torch.equal(torch.rand(8), expected)
    assert one.all_have(False) is False and one.all_have(True) is True
