"""GPU and scale: precision by what the GPU does natively, hooks that free the block outputs,
pinned batches, a feature cache that checks the disk first, data workers that fit /dev/shm,
and the card's module name.

No GPU is needed: torch.cuda's answers, shutil.disk_usage and os.statvfs are patched to describe
the machines in question.
"""

import re
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.utils.data._utils.pin_memory as loader_pinning

import rine_plus_ssca as rps
from rine_plus_ssca_tools import feature_cache
from conftest import write_demo_tree

CUDA = torch.device("cuda")


# --------------------------------------------------------------------------- precision


def describe_gpu(monkeypatch, capability):
    """torch.cuda as a GPU of this compute capability; is_bf16_supported says yes, as it does on a T4."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


def test_auto_precision_is_fp16_on_a_t4_that_only_emulates_bf16(monkeypatch):
    describe_gpu(monkeypatch, (7, 5))  # T4, RTX 20xx
    assert rps.resolve_amp_dtype("auto", CUDA) == torch.float16
    assert rps.resolve_amp_dtype("bf16", CUDA) == torch.bfloat16  # AMP still overrides
    assert rps.resolve_amp_dtype("off", CUDA) is None


def test_auto_precision_is_bf16_on_an_a100(monkeypatch):
    describe_gpu(monkeypatch, (8, 0))  # A100; an RTX 3090 is 8.6, an H100 9.0
    assert rps.resolve_amp_dtype("auto", CUDA) == torch.bfloat16
    assert rps.resolve_amp_dtype("fp16", CUDA) == torch.float16  # AMP still overrides
    describe_gpu(monkeypatch, (9, 0))
    assert rps.resolve_amp_dtype("auto", CUDA) == torch.bfloat16


# --------------------------------------------------------------------------- hooks


def test_hooks_keep_copies_of_the_tokens_not_views_of_the_whole_block_output(tiny_backbone):
    backbone = rps.FrozenCLIPBlocks(tiny_backbone, blocks="all", patch_block=2)
    batch, width, tokens = 3, backbone.width, backbone.grid ** 2 + 1
    with torch.no_grad():
        backbone.clip(pixel_values=torch.randn(batch, 3, 224, 224))  # the hooks fill _caught
    element = torch.finfo(backbone.clip.dtype).bits // 8
    for index in backbone.blocks:
        cls = backbone._caught[("cls", index)]
        assert cls.shape == (batch, width)
        assert cls._base is None  # not a view of the [B,T,width] output
        assert cls.untyped_storage().nbytes() == batch * width * element  # nothing else kept alive
    patches = backbone._caught[("patches", 2)]
    assert patches._base is None and patches.untyped_storage().nbytes() == batch * (tokens - 1) * width * element


def test_the_copied_tokens_are_the_layer_norm2_outputs(tiny_backbone):
    backbone = rps.FrozenCLIPBlocks(tiny_backbone, blocks="1,3")
    pixels = torch.randn(2, 3, 224, 224)
    seen = {}
    layers = backbone.clip.vision_model.encoder.layers if hasattr(backbone.clip, "vision_model") else backbone.clip.encoder.layers
    for index in (1, 3):
        layers[index].layer_norm2.register_forward_hook(
            lambda module, inputs, output, index=index: seen.__setitem__(index, output[:, 0].detach().clone()))
    cls_tokens, _ = backbone(pixels)
    assert torch.equal(cls_tokens[:, 0], seen[1].float()) and torch.equal(cls_tokens[:, 1], seen[3].float())


# --------------------------------------------------------------------------- pinned batches


def fake_pinning(monkeypatch):
    """Tensor.pin_memory needs CUDA; this one records each tensor and returns a marked copy."""
    pinned = []

    def pin(tensor, *args, **kwargs):
        copy = tensor.clone()
        copy.was_pinned = True
        pinned.append(copy)
        return copy
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    return pinned


def test_the_loaders_pinning_path_pins_every_tensor_of_a_batch(monkeypatch):
    pinned = fake_pinning(monkeypatch)
    samples = [rps.Sample(torch.full((3, 8, 8), i, dtype=torch.uint8), i % 2, i, 0, tokens=torch.randn(4, 6) if i else None)
               for i in range(3)]
    batch = rps.collate_skipping_bad(samples + [rps.Sample(None, 1, 7, 0, error="OSError: truncated")])
    original = {name: getattr(batch, name) for name in ("pixels", "labels", "indices", "views", "tokens", "cached")}
    # What DataLoader(pin_memory=True)'s pinning thread calls on every batch.
    result = loader_pinning.pin_memory(batch)
    assert len(pinned) == 6
    for name, tensor in original.items():
        now = getattr(result, name)
        assert getattr(now, "was_pinned", False), name
        assert torch.equal(now, tensor), name
    assert result.bad == [(7, "OSError: truncated")]


def test_pinning_skips_what_a_batch_does_not_have(monkeypatch):
    pinned = fake_pinning(monkeypatch)
    batch = rps.collate_skipping_bad([rps.Sample(torch.zeros(3, 8, 8, dtype=torch.uint8), 0, 0, 0)])
    assert batch.tokens is None
    result = loader_pinning.pin_memory(batch)
    assert len(pinned) == 5 and result.tokens is None
    empty = loader_pinning.pin_memory(rps.collate_skipping_bad([rps.Sample(None, 0, 0, 0, error="bad")]))
    assert empty.pixels is None and len(pinned) == 5


# --------------------------------------------------------------------------- feature cache and free disk

DiskUsage = namedtuple("DiskUsage", "total used free")


@pytest.fixture
def cache_setup(tmp_path, make_cfg):
    items = rps.scan_image_folder(write_demo_tree(tmp_path / "data", {"train": {"g": 3}}) / "train")[0]
    cfg = make_cfg(CACHE_FEATURES=True, CACHE_DIR=str(tmp_path / "cache"))
    backbone = rps.FrozenCLIPBlocks(cfg.CLIP_MODEL)
    return items, cfg, backbone


def test_a_cache_that_would_fill_the_disk_stops_with_one_line_before_growing(cache_setup, monkeypatch):
    items, cfg, backbone = cache_setup
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12 - 100_000, 100_000))
    with pytest.raises(rps.UserError) as error:
        feature_cache.open_feature_cache("train", items, cfg, backbone, n_views=4)
    message = str(error.value)
    assert "\n" not in message
    entry = feature_cache.FeatureCache(".", 1, 1, len(backbone.blocks), backbone.width, cfg.CROP_SIZE, backbone.clip.dtype).entry_bytes()
    needed_mb = float(re.search(r"needs ([\d.]+) MB more disk", message)[1])
    assert 6 * 4 * entry - 4 * 4096 <= needed_mb * 1e6 + 5e4 <= 6 * 4 * entry + 1e5  # 6 images x 4 views
    assert "has 0.1 MB free" in message
    for advice in ("--cache-dir", "--cache-views (now 4)", "--cache-features"):
        assert advice in message


def test_a_cache_opens_when_the_disk_has_room_and_needs_less_once_filled(cache_setup, monkeypatch):
    items, cfg, backbone = cache_setup
    asked = []
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: asked.append(path) or DiskUsage(10**12, 0, 10**12))
    cache = feature_cache.open_feature_cache("train", items, cfg, backbone, n_views=2)
    assert asked and str(asked[0]).startswith(cfg.CACHE_DIR)
    entry = cache.entry_bytes()
    # sparse files: nothing written yet, but for the last block of each (where the file's size was set)
    assert cache.bytes_to_fill() >= len(items) * 2 * entry - 4 * 4096
    n = len(items)
    pixels = torch.randint(0, 255, (n, 3, cfg.CROP_SIZE, cfg.CROP_SIZE), dtype=torch.uint8)
    tokens = torch.randn(n, len(backbone.blocks), backbone.width)
    for view in (0, 1):
        cache.put(torch.arange(n), torch.full((n,), view), pixels, tokens)
    cache.flush()
    assert cache.bytes_to_fill() <= 4 * 4096  # at most a partly written block per file
    # Filled, it opens again on a nearly full disk: only what is still to fill counts.
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12 - 10**6, 10**6))
    again = feature_cache.open_feature_cache("train", items, cfg, backbone, n_views=2)
    assert again.filled_fraction() == 1.0


# --------------------------------------------------------------------------- /dev/shm and data workers

BATCH_128 = 128 * 3 * 224 * 224  # uint8 crops: 19.3 MB


def shm_with_free(monkeypatch, free_bytes):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(rps.os, "statvfs", lambda path: SimpleNamespace(f_bavail=free_bytes // 4096, f_frsize=4096))


def test_docker_default_shm_means_no_worker_processes_with_a_message_saying_what_to_pass(monkeypatch, capsys):
    shm_with_free(monkeypatch, 64 * 2**20)  # Docker's default
    assert rps.workers_within_shared_memory(8, BATCH_128, 4) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    assert "need 0.62 GB of shared memory" in out and "0.07 GB free" in out
    assert "--num-workers 0" in out and "--shm-size" in out


def test_workers_are_lowered_to_what_fits_and_left_alone_when_all_fit(monkeypatch, capsys):
    shm_with_free(monkeypatch, 300 * 10**6)
    assert rps.workers_within_shared_memory(8, BATCH_128, 4) == 3  # 3 x 4 x 19.3 MB = 231 MB
    assert "--num-workers 3" in capsys.readouterr().out
    shm_with_free(monkeypatch, 2 * 10**9)
    assert rps.workers_within_shared_memory(8, BATCH_128, 4) == 8
    assert rps.workers_within_shared_memory(0, BATCH_128, 4) == 0
    assert capsys.readouterr().out == ""
    # torchrun's processes on one machine share /dev/shm
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert rps.workers_within_shared_memory(8, BATCH_128, 4) == 6


def test_make_loader_asks_for_no_more_workers_than_shared_memory_holds(monkeypatch, make_cfg, tmp_path, capsys):
    shm_with_free(monkeypatch, 100 * 10**6)
    monkeypatch.setattr(rps.os, "cpu_count", lambda: 16)
    items = [(str(tmp_path / f"{i}.png"), i % 2, "") for i in range(4)]
    cfg = make_cfg(NUM_WORKERS=8, BATCH_SIZE=128)
    loader = rps.make_loader(items, cfg, train=False, device=torch.device("cpu"))
    assert loader.num_workers == 1  # 100 MB // (4 x 19.3 MB)
    # ten-crop evaluation hands over ten crops per image: 64 x 10 x 150 kB = 96 MB per batch
    tencrop = rps.make_loader(items, cfg, train=False, device=torch.device("cpu"), batch_size=64,
                              transform=rps.build_transform(cfg, False, tencrop=True))
    assert rps.batch_bytes(tencrop.dataset, 64, 224) == 64 * 10 * 3 * 224 * 224
    assert tencrop.num_workers == 0
    assert capsys.readouterr().out.count("warning:") == 2


def test_batch_bytes_counts_cached_tokens(cache_setup):
    items, cfg, backbone = cache_setup
    cache = feature_cache.FeatureCache(cfg.CACHE_DIR, len(items), 1, len(backbone.blocks), backbone.width, cfg.CROP_SIZE,
                             backbone.clip.dtype)
    dataset = rps.ImageDataset(items, rps.build_transform(cfg, True), cache)
    assert rps.batch_bytes(dataset, 8, 224) == 8 * (3 * 224 * 224 + len(backbone.blocks) * backbone.width * 4)


# --------------------------------------------------------------------------- names


def test_the_cards_module_name_is_importable_and_is_the_class_the_model_uses(make_cfg):
    from rine_plus_ssca import SSCA, SpectrumSpatialCollaborativeAttention

    assert SSCA is SpectrumSpatialCollaborativeAttention
    model = rps.RINEPlusSSCA(make_cfg())
    assert type(model.ssca) is SSCA
    x = torch.randn(2, 16, 28, 28)
    assert SSCA(16, 28, 28)(x).shape == x.shape
    assert np.isfinite(SSCA(16, 28, 28)(x).detach().numpy()).all()
