"""RINE's own weight format (github.com/mever-team/rine) and the commands that convert checkpoints:

    python rine_plus_ssca.py import-rine --ckpt model_4class_trainable.pth --out checkpoints/rine_4class.pth
    python rine_plus_ssca.py export --ckpt checkpoints/best_rine_plus_ssca.pth --out detector.safetensors

load_detector reads an exported .safetensors file through read_exported below.
"""

import hashlib
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from rine_plus_ssca import (CHECKPOINT_FORMAT, CHOICES, CLIP_MODEL, OneLineErrorParser, UserError, atomic_torch_save,
                            atomic_write_bytes, checkpoint_config, checkpoint_record, default_config, first_line,
                            parse_block_list, read_checkpoint)


# RINE's released trainable checkpoints (github.com/mever-team/rine, ckpt/model_*_trainable.pth) are plain
# dicts of tensors with the keys below; a USE_SPECTRAL=False checkpoint of this script holds the same ones.
def rine_key_shapes(width, n_blocks, dim, nproj):
    """{key: shape} of RINE's trainable weights for a backbone of `width` and `n_blocks` blocks, d'=dim."""
    shapes = {"alpha": (1, n_blocks, dim)}
    for name in ("proj1", "proj2"):
        for i in range(nproj):  # Dropout, then nproj x [Linear, ReLU, Dropout]: the Linears are at 1, 4, 7, ...
            shapes[f"{name}.{3 * i + 1}.weight"] = (dim, width if name == "proj1" and i == 0 else dim)
            shapes[f"{name}.{3 * i + 1}.bias"] = (dim,)
    for index, out_dim in ((0, dim), (3, dim), (6, 1)):  # head: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
        shapes[f"head.{index}.weight"], shapes[f"head.{index}.bias"] = (out_dim, dim), (out_dim,)
    return shapes


def read_rine_weights(path):
    """One of RINE's trainable checkpoints -> (state dict, backbone width, n_blocks, d', NPROJ), read from the shapes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No file {path}; download ckpt/model_4class_trainable.pth from github.com/mever-team/rine "
                        "and pass it with --ckpt.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if isinstance(error, pickle.UnpicklingError) and zipfile.is_zipfile(path):  # a torch.save file with objects
            raise UserError(f"Refused {path}: loading it would need pickle, which can run arbitrary code. RINE's "
                            "trainable checkpoints are plain dicts of tensors.") from error
        raise UserError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}); import-rine reads RINE's "
                        "ckpt/model_*_trainable.pth files.") from error
    if isinstance(state, dict) and "model" in state and {"architecture", "config"} & state.keys():
        raise UserError(f"{path} is already a checkpoint of rine_plus_ssca.py; use it with eval/predict directly "
                        "(import-rine reads RINE's own files).")
    not_rine = f"{path} is not one of RINE's trainable checkpoints (a dict of tensors alpha, proj1.*, proj2.*, head.*)"
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              and v.is_floating_point() for k, v in state.items()):
        raise UserError(f"{not_rine}.")
    alpha, first = state.get("alpha"), state.get("proj1.1.weight")
    if alpha is None or alpha.dim() != 3 or first is None or first.dim() != 2:
        raise UserError(f"{not_rine}: no alpha [1,n_blocks,d'] or proj1.1.weight [d',width].")
    n_blocks, dim, width = alpha.shape[1], alpha.shape[2], first.shape[1]
    nproj = sum(1 for key in state if re.fullmatch(r"proj1\.\d+\.weight", key))
    expected = rine_key_shapes(width, n_blocks, dim, nproj)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{not_rine}: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    wrong = [f"{key} {list(state[key].shape)} (expected {list(shape)})" for key, shape in expected.items()
             if tuple(state[key].shape) != shape]
    if wrong:
        raise UserError(f"{path} has shapes that do not fit together (d'={dim}, NPROJ={nproj}, {n_blocks} blocks of "
                        f"width {width}): {', '.join(wrong[:2])}.")
    return {key: state[key].float().contiguous() for key in expected}, width, n_blocks, dim, nproj


def rine_checkpoint(path, clip_model, amp):
    """RINE's trainable checkpoint at `path` as a checkpoint of this script: USE_SPECTRAL=False, d' and NPROJ
    from the shapes, every block, RINE's centre crop of 224."""
    state, width, n_blocks, dim, nproj = read_rine_weights(path)
    config = vars(default_config())
    config.update(CLIP_MODEL=clip_model, AMP=amp, USE_SPECTRAL=False, USE_TIE=True, BLOCKS="all", PROJ_DIM=dim,
                  NPROJ=nproj, CROP_SIZE=224, DROPOUT=0.5, TEST_CROP="rine",
                  TRAIN_RECIPE="rine", JPEG_QUALITY_MIN=30)  # how RINE trained it (a record; nothing here trains it)
    backbone = {"hidden_size": width, "num_hidden_layers": n_blocks}  # checked when the backbone is loaded
    checkpoint = checkpoint_record(config, backbone, state, 0, {}, [])
    checkpoint["imported_from"] = {"file": Path(path).name,
                                   "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
    return checkpoint


def rine_weights(checkpoint, path):
    """A USE_SPECTRAL=False checkpoint's weights in RINE's format (what read_rine_weights reads back)."""
    config, n_layers = checkpoint["architecture"], checkpoint["backbone_config"].get("num_hidden_layers")
    if config.get("USE_SPECTRAL", True):
        raise UserError(f"{path} is a RINE+SSCA checkpoint; only one trained with --no-use-spectral (RINE) can be "
                        "written in RINE's format.")
    if n_layers is None or parse_block_list(str(config.get("BLOCKS", "all")), n_layers) != list(range(n_layers)):
        raise UserError(f"{path} uses BLOCKS={config.get('BLOCKS')!r}; RINE's format needs every block (BLOCKS='all').")
    state = dict(checkpoint["model"])
    if "alpha" not in state:  # USE_TIE=False: the plain mean over blocks is the TIE sum with alpha = 0
        state["alpha"] = torch.zeros(1, n_layers, config["PROJ_DIM"])
    return state


def build_export_parser():
    """Options of the export command."""
    parser = OneLineErrorParser(prog="rine_plus_ssca.py export", allow_abbrev=False,
                                description="Write a checkpoint's trainable weights as safetensors (config in its metadata). "
                                            "eval, predict and load_detector accept the file like a .pth checkpoint.")
    parser.add_argument("--ckpt", required=True, help="checkpoint file (.pth)")
    parser.add_argument("--out", required=True, help="output file, e.g. detector.safetensors")
    parser.add_argument("--rine-format", action="store_true",
                        help="write a --no-use-spectral checkpoint as RINE's own trainable .pth (a dict of tensors), "
                             "e.g. rine_trainable.pth, instead of safetensors")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def read_exported(path):
    """A file written by the export command: tensors, with config, metrics and calibration as JSON metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        checkpoint = {"format": int(metadata.get("format", "0")), "config": json.loads(metadata["config"]),
                      "model": tensors, "metrics": json.loads(metadata.get("metrics", "{}")),
                      "backbone_folder": metadata.get("backbone_folder") or None}
        if "calibration" in metadata:
            checkpoint["calibration"] = json.loads(metadata["calibration"])
        return checkpoint
    except Exception as error:  # not safetensors, or safetensors without our metadata
        raise UserError(f"{path} is not a file written by `rine_plus_ssca.py export` ({type(error).__name__}: "
                        f"{first_line(error)}).") from error


def run_export(args):
    """The export command: trainable weights to safetensors, config, metrics and calibration as JSON metadata
    (read back by read_exported)."""
    from safetensors.torch import save

    checkpoint = read_checkpoint(args.ckpt)
    if args.rine_format:
        state = rine_weights(checkpoint, args.ckpt)
        atomic_torch_save(state, args.out)
        print(f"wrote {args.out} in RINE's format ({len(state)} tensors, d'={checkpoint['architecture']['PROJ_DIM']}, "
              f"NPROJ={checkpoint['architecture']['NPROJ']})")
        if "calibration" in checkpoint:
            print(f"note: RINE's format holds the weights only; the temperature {checkpoint['calibration']['temperature']:.3g} "
                  "fitted in training is not in it (P(fake) from the file is uncalibrated)")
        return 0
    tensors = {name: tensor.contiguous() for name, tensor in checkpoint["model"].items()}
    metadata = {"format": str(CHECKPOINT_FORMAT), "config": json.dumps(checkpoint_config(checkpoint)),
                "metrics": json.dumps(checkpoint.get("metrics", {})),
                "backbone_folder": checkpoint.get("backbone_folder") or ""}
    if "calibration" in checkpoint:
        metadata["calibration"] = json.dumps(checkpoint["calibration"])
    atomic_write_bytes(save(tensors, metadata=metadata), args.out)
    print(f"wrote {args.out} ({len(tensors)} tensors, {Path(args.out).stat().st_size / 1e6:.1f} MB)")
    return 0


def build_import_rine_parser():
    """Options of the import-rine command."""
    parser = OneLineErrorParser(prog="rine_plus_ssca.py import-rine", allow_abbrev=False,
                                description="Turn one of RINE's released trainable checkpoints (github.com/mever-team/rine, "
                                            "ckpt/model_*_trainable.pth) into a checkpoint for eval, predict and load_detector.")
    parser.add_argument("--ckpt", required=True, help="RINE's file, e.g. model_4class_trainable.pth")
    parser.add_argument("--out", required=True, help="checkpoint to write, e.g. checkpoints/rine_4class.pth")
    parser.add_argument("--clip-model", default=CLIP_MODEL, help="the backbone RINE was trained on (CLIP ViT-L/14): "
                        "a HuggingFace id or a local folder")
    parser.add_argument("--amp", default="auto", choices=CHOICES["AMP"],
                        help="backbone precision stored in the checkpoint (AMP); 'auto' = RINE's own: fp16 on a GPU, float32 on the CPU; 'off' = float32")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def run_import_rine(args):
    """The import-rine command: d' and NPROJ read from the shapes, written atomically."""
    checkpoint = rine_checkpoint(args.ckpt, args.clip_model, args.amp)
    atomic_torch_save(checkpoint, args.out)
    config, backbone = checkpoint["architecture"], checkpoint["backbone_config"]
    print(f"wrote {args.out}: RINE (USE_SPECTRAL=False) with d'={config['PROJ_DIM']}, NPROJ={config['NPROJ']}, for a "
          f"backbone of width {backbone['hidden_size']} with {backbone['num_hidden_layers']} blocks ({args.clip_model})")
    return 0


COMMANDS = {"export": (build_export_parser, run_export), "import-rine": (build_import_rine_parser, run_import_rine)}
