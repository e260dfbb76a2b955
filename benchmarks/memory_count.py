"""Count the GPU memory a training step (or a ten-crop evaluation) needs, per batch size, without a GPU.

    python benchmarks/memory_count.py --arch vitl --batch-sizes 32,64,128,256
    python benchmarks/memory_count.py --arch vitl --batch-sizes 64 --tencrop      # eval --tencrop: 10 crops per image

For the ViT-L/14 architecture (random weights, nothing downloaded) it counts, in bytes:
  weights      the frozen backbone in bf16 and the trainable head in float32
  optimizer    Adam's two moments and the gradients of the head (float32; none in evaluation)
  head         training: every tensor autograd saves for the backward pass of the head, measured with
               torch.autograd.graph.saved_tensors_hooks on a real forward (float32 on the CPU;
               bf16 autocast on a GPU saves about half of the matmul inputs, so this is an upper bound).
               --tencrop: the peak of the head's live tensors during an inference forward, measured
               by following every tensor the forward creates until it is freed
  backbone     the frozen forward runs without autograd, so only one block's working set is
               alive at a time: hidden states, the MLP's 4x wide activation and the attention
               scores, in bf16 (an analytic count; SDPA's fused kernels need less), plus the CLS
               tokens the hooks keep (copies: [B,width] per block). A hook that kept the view
               output[:, 0] would keep each block's whole [B,257,width] output alive instead; the
               last column says how much that would add.
With --tencrop every image is 10 crops, so a batch of B sends 10 x B images through the backbone.
This is a count, not a measurement of a GPU run; CUDA's allocator and the context add
roughly 0.5-1 GB on top.
"""

import argparse
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


class PeakOfLiveTensors(TorchDispatchMode):
    """Peak bytes of the tensors created inside the `with` block that are alive at the same time.

    Each new storage an operation returns is counted until Python frees it (views and in-place
    results share an input's storage and are not counted again).
    """

    def __init__(self):
        super().__init__()
        self.live, self.peak, self._counted = 0, 0, set()

    def _freed(self, key, n_bytes):
        self._counted.discard(key)
        self.live -= n_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._counted or storage.nbytes() == 0:
                continue
            self._counted.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out


def live_bytes_of_head_inference(model, n_images, cfg):
    """Peak bytes the head's inference forward holds at once for n_images (backbone tokens given)."""
    n_blocks, width = len(model.backbone.blocks), model.backbone.width
    pixels = torch.randn(n_images, 3, cfg.CROP_SIZE, cfg.CROP_SIZE)
    tokens = torch.randn(n_images, n_blocks, width)
    model.eval()
    with torch.inference_mode(), PeakOfLiveTensors() as tracker:
        model(pixels, tokens)
    return tracker.peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="vitl")
    parser.add_argument("--batch-sizes", default="32,64,128,256")
    parser.add_argument("--tencrop", action="store_true", help="count `eval --tencrop` (10 crops per image) instead of training")
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
    optimizer = 0 if args.tencrop else head_parameters * 4 * 3  # gradients + Adam's two moments
    element = 2  # bf16 backbone

    print(f"arch {args.arch}, {'eval --tencrop (10 crops per image)' if args.tencrop else 'training'}: backbone "
          f"{backbone_weights / 1e9:.2f} GB (bf16), head {head_parameters / 1e6:.1f} M parameters = "
          f"{head_weights / 1e9:.3f} GB, gradients + Adam {optimizer / 1e9:.3f} GB\n")
    print(f"{'batch':>5}  {'head':>6}  {'backbone':>9}  {'total':>7}  {'views kept':>10}   (GB)")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        images = batch_size * (10 if args.tencrop else 1)
        if args.tencrop:
            head = live_bytes_of_head_inference(model, images, cfg)
        else:
            head = saved_bytes_of_head(model, batch_size, cfg)
            model.zero_grad(set_to_none=True)
        # One block at a time: residual stream x2, the 4x MLP activation, attention scores (heads x T x T).
        per_block = images * tokens * (2 * config.hidden_size + config.intermediate_size) * element
        per_block += images * config.num_attention_heads * tokens * tokens * element
        # The hooks' copies of the CLS token (bf16), then stacked into one float32 tensor.
        cls_kept = images * n_layers * config.hidden_size * (element + 4)
        backbone = per_block + cls_kept
        total = backbone_weights + head_weights + optimizer + head + backbone
        # What views output[:, 0] would keep instead of the copies: every block's whole layer_norm2 output.
        views_kept = images * n_layers * (tokens - 1) * config.hidden_size * element
        print(f"{batch_size:>5}  {head / 1e9:>6.2f}  {backbone / 1e9:>9.2f}  {total / 1e9:>7.2f}  {views_kept / 1e9:>+10.2f}")


if __name__ == "__main__":
    main()
