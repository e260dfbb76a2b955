"""Training under torchrun: several processes, one per GPU (or gloo processes on a CPU), as one run.

`python rine_plus_ssca.py` alone trains in one process, whose joint decisions are its own (the script's
OneProcess). Under torchrun (WORLD_SIZE > 1) the script's join_processes hands training a
TorchrunProcesses instead, which answers the same calls across the processes:

    once(compute)                   work that reads every file (the file list, the cache's key) done by process 0
    all_have(has_images)            a step is taken by every process or by none
    share_stop_reasons(logs, stop)  a stop asked for, or too many unreadable images, seen by one process stops all
    gather(arrays, bce_sum)         the validation scores of every process's share of the images
    for_training(model, cfg)        SyncBatchNorm and DistributedDataParallel
    first_nonfinite_step(step)      the first NaN/inf step seen by any process
    end_epoch(progress, model)      the epoch's losses over the global batch, process 0's BatchNorm statistics

Each process takes every world_size-th sample of the global order (the script's SeededEpochSampler), so
a global batch is the same set of images as in one process, and process 0 alone prints and saves.
"""

import os
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from rine_plus_ssca import UserError


class TorchrunProcesses:
    """This process's place in a torchrun run and the calls that keep its processes in step.

    control_group carries the joint decisions on the CPU, over gloo, so that making them never waits for
    the GPU (with NCCL for the gradients, a gloo group beside it).
    """

    def __init__(self, rank, world_size, device, control_group):
        self.rank, self.world_size, self.device, self.control_group = rank, world_size, device, control_group

    def once(self, compute):
        """compute() done by process 0 alone and its result (or its error) handed to all processes.

        A UserError found by process 0 ends every process with the same one line, not only process 0.
        """
        outcome = [None]
        if self.rank == 0:
            try:
                outcome[0] = ("result", compute())
            except UserError as error:
                outcome[0] = ("user error", str(error))
            except BaseException as error:
                dist.broadcast_object_list([("failure", f"{type(error).__name__}: {error}")], src=0,
                                           group=self.control_group)
                raise
        dist.broadcast_object_list(outcome, src=0, group=self.control_group)
        kind, value = outcome[0]
        if kind == "user error":
            raise UserError(value)
        if kind == "failure":
            raise RuntimeError(f"process 0 failed: {value}")
        return value

    def all_have(self, has_images):
        """Whether every process has images for this step. DDP's gradient all-reduce waits for all processes,
        so one whose whole share of the batch was unreadable must not skip the step alone."""
        flag = torch.tensor([int(has_images)])
        dist.all_reduce(flag, dist.ReduceOp.MIN, group=self.control_group)
        return bool(flag.item())

    def share_stop_reasons(self, bad_logs, stop=None):
        """All processes reach the same verdict at the same step, whichever of them saw the images or the
        signal: one that stopped alone would leave the others waiting in a collective. A split with too many
        unreadable images (counted over all processes) raises its UserError here; a signal one process got
        is set on every process's `stop`."""
        asked = stop.requested if stop is not None else 0
        counts = torch.tensor([int(asked == signal.SIGINT), int(asked == signal.SIGTERM)]
                              + [len(log.bad) for log in bad_logs])
        dist.all_reduce(counts, group=self.control_group)
        for log, n_bad in zip(bad_logs, counts[2:].tolist()):
            if log.too_many(n_bad):  # at most this many: one image can be unreadable to several processes
                found = [None] * self.world_size
                dist.all_gather_object(found, list(log.bad), group=self.control_group)
                log.check(sorted(set().union(*found)))
        if stop is not None and not stop.requested and counts[:2].any():
            stop.requested = signal.SIGTERM if counts[1] else signal.SIGINT

    def gather(self, arrays, bce_sum):
        """Validation results of all processes: each array concatenated, the BCE sums added."""
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, (arrays, bce_sum))
        return (tuple(np.concatenate([g[0][i] for g in gathered]) for i in range(len(arrays))),
                sum(g[1] for g in gathered))

    def for_training(self, model, cfg):
        """The model wrapped in DistributedDataParallel; on GPUs its BatchNorms see the global batch."""
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":  # SyncBatchNorm runs on GPUs only
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the top module: same parameters
        # With XI = 0 the SupCon projection gets no gradient; DDP must be told to expect that.
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=cfg.XI == 0)

    def first_nonfinite_step(self, first_step):
        """The first step at which any process saw a NaN/inf loss (-1: none), in place."""
        dist.all_reduce(first_step, dist.ReduceOp.MAX)
        return first_step

    def seed_dropout(self, seed, epoch, step):
        """Each process its own dropout stream, from SEED, the rank and the starting position (with one seed
        every process would drop the same units). Augmentation needs nothing: each image's view is seeded
        from (DATA_SEED, image, view) in the sampler."""
        torch.manual_seed(((seed * 1_000_003 + self.rank) * 1_000_033 + epoch) * 1_000_037 + step)

    def end_epoch(self, progress, model):
        """After the epoch's steps: its losses summed over the global batch, and process 0's BatchNorm
        statistics in every process, so that validation scores exactly what process 0 saves."""
        dist.all_reduce(progress.sums)
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)

    def wait_for_process_zero(self):
        dist.barrier()

    def close(self):
        dist.destroy_process_group()


def join(cfg):
    """This process's TorchrunProcesses: joins torchrun's process group, NCCL with one GPU per process, gloo
    on the CPU. Processes other than 0 print nothing."""
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and cfg.DEVICE != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    control_group = dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
    rank = dist.get_rank()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # one voice: process 0 prints and saves
    if cfg.BATCH_SIZE % world_size:
        raise UserError(f"BATCH_SIZE={cfg.BATCH_SIZE} must be divisible by the {world_size} processes (it is the "
                        "global batch).")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return TorchrunProcesses(rank, world_size, device, control_group)
