"""Count the GPU memory a training step needs, per batch size, without a GPU.

    python benchmarks/memory_count.py --arch vitl --batch-sizes 32,64,128,256

For the ViT-L/14 architecture (random weights, nothing downloaded) it counts, in bytes:
  weights      the frozen backbone in bf16 and the trainable head in float32
  optimizer    Adam's two moments and the gradients of the head (float32)
  head         every tensor autograd saves for the backward pass of the head, measured with
               torch.autograd.graph.saved_tensors_hooks on a real forward (float32 on the CPU;
               bf16 autocast on a GPU saves about half of the matmul inputs, so this is an upper bound)
  backbone     the frozen forward runs without autograd, so only one block's working set is
               alive at a time: hidden states, the MLP's 4x wide activation and the attention
               scores, in bf16 (an analytic count; SDPA's fused kernels need less)
This is a count, not a measurement of a GPU run; CUDA's allocator and the context add
roughly 0.5-1 GB on top.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rine_plus_ssca as rps  # noqa: E402
from throughput import ARCHITECTURES, make_backbone  # noqa: E402


def saved_bytes_of_head(model, batch_size, cfg):
    """Bytes autograd keeps for backward in one training forward of the head (backbone tokens given)."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    n_blocks, width = len(model.backbone.blocks), model.backbone.width
    pixels = torch.randn(batch_size, 3, cfg.CROP_SIZE, cfg.CROP_SIZE)
    tokens = torch.randn(batch_size, n_blocks, width)
    labels = torch.randint(0, 2, (batch_size,)).float()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits, features = model(pixels, tokens)
        loss = rps.bce_loss_sum(logits, labels) + cfg.XI * rps.supervised_contrastive_loss(features, labels)
    loss.backward()
    return sum(saved)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="vitl")
    parser.add_argument("--batch-sizes", default="32,64,128,256")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rps_mem_") as work:  # removed afterwards: a ViT-L backbone is 1.2 GB
        count(args, Path(work) / "backbone")


def count(args, folder):
    make_backbone(args.arch, folder)
    cfg = rps.default_config()
    cfg.CLIP_MODEL, cfg.AMP = str(folder), "off"
    model = rps.build_model(cfg, torch.device("cpu"))
    config = model.backbone.clip.config
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    n_layers = len(model.backbone.blocks)
    backbone_weights = sum(p.numel() for p in model.backbone.parameters()) * 2  # bf16
    head_parameters = sum(p.numel() for p in model.trainable_parameters())
    head_weights = head_parameters * 4
    optimizer = head_parameters * 4 * 3  # gradients + Adam's two moments

    print(f"arch {args.arch}: backbone {backbone_weights / 1e9:.2f} GB (bf16), head {head_parameters / 1e6:.1f} M "
          f"parameters = {head_weights / 1e9:.3f} GB, gradients + Adam {optimizer / 1e9:.3f} GB\n")
    print(f"{'batch':>5}  {'head saved':>10}  {'backbone':>9}  {'total':>7}   (GB)")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        head = saved_bytes_of_head(model, batch_size, cfg)
        model.zero_grad(set_to_none=True)
        # One block at a time: residual stream x2, the 4x MLP activation, attention scores (heads x T x T).
        per_block = batch_size * tokens * (2 * config.hidden_size + config.intermediate_size) * 2
        per_block += batch_size * config.num_attention_heads * tokens * tokens * 2
        cls_kept = batch_size * n_layers * config.hidden_size * 4
        backbone = per_block + cls_kept
        total = backbone_weights + head_weights + optimizer + head + backbone
        print(f"{batch_size:>5}  {head / 1e9:>10.2f}  {backbone / 1e9:>9.2f}  {total / 1e9:>7.2f}")


if __name__ == "__main__":
    main()
