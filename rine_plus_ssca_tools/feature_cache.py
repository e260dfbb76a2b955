"""The feature cache (CACHE_FEATURES): the frozen backbone's CLS tokens and the uint8 crop they came from,
computed once per (image, view) and read back by later epochs and runs, which then skip decoding and CLIP.

Training opens it through open_feature_cache when --cache-features is on; the script reads entries
through the dataset (ImageDataset) and tokens_from_cache_or_backbone.
"""

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from rine_plus_ssca import INPUT_CONSTANTS, UserError

CACHE_FORMAT = 3  # bumped when an entry's meaning changes (2: crops on the 8-pixel grid; 3: symmetric padding, TRAIN_RECIPE)
EMPTY, FILLED, UNREADABLE = 0, 1, 2
_TOKEN_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # bf16 as raw bits


def readable_size(n_bytes):
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


class FeatureCache:
    """The frozen backbone's CLS tokens and the uint8 crop they came from, per (image, view), on disk.

    Files in its folder, memory-mapped: pixels [N,V,3,S,S] uint8, tokens [N,V,n_blocks,width]
    in the backbone's dtype, state [N,V] (empty/filled/unreadable) and a CRC32 per entry.
    The folder name is a hash of everything an entry depends on (cache_key), so a changed
    backbone, image file, crop or augmentation constant opens a new cache instead of serving
    a stale one. An entry is used only when its state says filled AND its CRC matches, so an
    entry half-written by a killed run, or damaged on disk, is recomputed, never used.
    """

    FILLED = FILLED  # the state of an entry written whole (the dataset compares with it)

    def __init__(self, folder, n_items, n_views, n_blocks, width, crop, token_dtype):
        self.folder = Path(folder)
        self.shapes = {"pixels": (n_items, n_views, 3, crop, crop), "tokens": (n_items, n_views, n_blocks, width),
                       "state": (n_items, n_views), "crc": (n_items, n_views)}
        self.dtypes = {"pixels": np.uint8, "tokens": _TOKEN_STORAGE[token_dtype], "state": np.uint8, "crc": np.uint32}
        self.token_dtype = token_dtype
        self._arrays, self._pid = None, None
        self.damaged = 0

    def entry_bytes(self):
        return sum(int(np.prod(self.shapes[k][2:])) * np.dtype(self.dtypes[k]).itemsize for k in ("pixels", "tokens"))

    def create_or_open(self):
        """Make the files if they don't exist (or don't match); returns True when newly made."""
        meta_path = self.folder / "meta.json"
        meta = {"format": CACHE_FORMAT, "shapes": {k: list(v) for k, v in self.shapes.items()},
                "dtypes": {k: np.dtype(v).name for k, v in self.dtypes.items()}}
        sizes_ok = meta_path.exists() and all(
            (self.folder / f"{k}.bin").exists()
            and (self.folder / f"{k}.bin").stat().st_size == int(np.prod(self.shapes[k])) * np.dtype(self.dtypes[k]).itemsize
            for k in self.shapes)
        if sizes_ok and json.loads(meta_path.read_text()) == meta:
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)
        for name in self.shapes:  # sparse files: disk is used as entries are filled
            np.memmap(self.folder / f"{name}.bin", dtype=self.dtypes[name], mode="w+", shape=self.shapes[name]).flush()
        meta_path.write_text(json.dumps(meta))  # written last: a folder without it is rebuilt
        return True

    def bytes_to_fill(self):
        """Disk the files still need: created sparse, they take space only as entries are written."""
        files = [os.stat(self.folder / f"{name}.bin") for name in self.shapes]
        # st_blocks counts the 512-byte blocks on disk (Windows has none: files counted as allocated)
        return sum(max(0, f.st_size - getattr(f, "st_blocks", f.st_size // 512) * 512) for f in files)

    def check_free_disk(self):
        """Stop now, with what to do, rather than with SIGBUS when a memory-mapped write finds the disk full."""
        needed, free = self.bytes_to_fill(), shutil.disk_usage(self.folder).free
        if needed > free:
            raise UserError(f"The feature cache needs {readable_size(needed)} more disk but {self.folder.parent} has "
                            f"{readable_size(free)} free ({self.entry_bytes() / 1e3:.0f} kB per image and view). Set "
                            f"--cache-dir to a disk with room, lower --cache-views (now {self.shapes['state'][1]}), "
                            "or train without --cache-features.")

    def _open(self):
        if self._arrays is None or self._pid != os.getpid():  # each worker process maps the files itself
            self._arrays = {k: np.memmap(self.folder / f"{k}.bin", dtype=self.dtypes[k], mode="r+", shape=self.shapes[k])
                            for k in self.shapes}
            self._pid = os.getpid()
        return self._arrays

    @staticmethod
    def _crc(pixels, tokens):
        return zlib.crc32(tokens.tobytes(), zlib.crc32(pixels.tobytes()))

    def state(self, index, view):
        return int(self._open()["state"][index, view])

    def get(self, index, view):
        """(uint8 pixels [3,S,S], float32 tokens [n,width]) of a valid entry, else None."""
        arrays = self._open()
        if arrays["state"][index, view] != FILLED:
            return None
        pixels, tokens = np.array(arrays["pixels"][index, view]), np.array(arrays["tokens"][index, view])
        if self._crc(pixels, tokens) != arrays["crc"][index, view]:
            return None
        tokens = torch.from_numpy(tokens.view(np.int16)).view(torch.bfloat16) if self.token_dtype == torch.bfloat16 \
            else torch.from_numpy(tokens)
        return torch.from_numpy(pixels), tokens.float()

    def put(self, indices, views, pixels, tokens):
        """Store computed entries: pixels uint8 [B,3,S,S], tokens [B,n,width] (float32 holding backbone-dtype values)."""
        arrays = self._open()
        stored = tokens.to(self.token_dtype)
        stored = stored.view(torch.int16).numpy().view(np.uint16) if self.token_dtype == torch.bfloat16 else stored.numpy()
        pixels = pixels.numpy()
        for row, (index, view) in enumerate(zip(indices.tolist(), views.tolist())):
            arrays["state"][index, view] = EMPTY  # invalid until pixels, tokens and CRC are all written
            arrays["pixels"][index, view] = pixels[row]
            arrays["tokens"][index, view] = stored[row]
            arrays["crc"][index, view] = self._crc(pixels[row], stored[row])
            arrays["state"][index, view] = FILLED

    def filled_fraction(self, view=None):
        state = self._open()["state"]
        state = state if view is None else state[:, view]
        return float((state == FILLED).mean())

    def flush(self):
        if self._arrays is not None:
            for array in self._arrays.values():
                array.flush()

    def __getstate__(self):  # workers get the description, not the open maps
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = None, None
        return state


def backbone_fingerprint(backbone):
    """SHA-256 of the backbone's weights, dtype and chosen blocks: a new backbone never reads old tokens."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.clip.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps([str(backbone.clip.dtype), backbone.blocks]).encode())
    return digest.hexdigest()


def feature_cache_folder(split_name, items, cfg, backbone, n_views):
    """The cache folder of one split, named by a digest of everything its entries depend on (reads every file's size and time)."""
    digest = hashlib.sha256(backbone_fingerprint(backbone).encode())
    constants = {name: getattr(cfg, name) for name in INPUT_CONSTANTS}
    digest.update(json.dumps([CACHE_FORMAT, split_name, n_views, constants], sort_keys=True).encode())
    for path, label, _ in items:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    root = Path(cfg.CACHE_DIR) if cfg.CACHE_DIR else Path(cfg.CHECKPOINT_DIR) / "cache"
    return root / f"{split_name}-{digest.hexdigest()[:16]}"


def open_feature_cache(split_name, items, cfg, backbone, n_views, rank=0, folder=None):
    """The FeatureCache for one split, in `folder` (by default feature_cache_folder's)."""
    if backbone.patch_block is not None:
        raise UserError("CACHE_FEATURES stores CLS tokens only; use it with SPECTRAL_INPUT='dct' (or turn the cache off).")
    folder = folder or feature_cache_folder(split_name, items, cfg, backbone, n_views)
    cache = FeatureCache(folder, len(items), n_views, len(backbone.blocks), backbone.width, cfg.CROP_SIZE,
                         backbone.clip.dtype)
    if rank == 0:
        total = cache.entry_bytes() * len(items) * n_views
        if cache.create_or_open():
            print(f"feature cache for {split_name}: {cache.folder}, up to {readable_size(total)} "
                  f"({len(items)} images x {n_views} view(s) x {cache.entry_bytes() / 1e3:.0f} kB)")
        else:
            print(f"feature cache for {split_name}: {cache.folder}, {cache.filled_fraction():.0%} filled")
        cache.check_free_disk()
    return cache
