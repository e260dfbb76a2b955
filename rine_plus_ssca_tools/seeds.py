"""Training one configuration over several seeds (`python rine_plus_ssca.py --seeds 0,1,2`): one run per
seed in CHECKPOINT_DIR/seed_<n>, then the validation metrics of each run's best epoch with their mean and
std. A result is a spread over seeds, not one run's number (docs/GUIDE.md, Comparing models).
"""

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from rine_plus_ssca import BEST_NAME, LAST_NAME, UserError, format_table, read_checkpoint, train

SEED_SUMMARY_METRICS = ("val_bce", "acc", "ap", "auc")


def train_seeds(cfg, seeds):
    """Train the configuration once per seed, each in CHECKPOINT_DIR/seed_<n>; print the validation metrics of
    each best checkpoint and their mean +- std. Returns the best checkpoints' paths.

    Only SEED changes (the head's initial weights, the batch order, dropout); DATA_SEED stays, so every run
    validates on the same images and reads the same cached tokens (CACHE_DIR is shared).
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds takes distinct seeds, e.g. 0,1,2 (got {seeds}).")
    base = Path(cfg.CHECKPOINT_DIR)
    shared = dict(CACHE_DIR=cfg.CACHE_DIR or str(base / "cache"))
    best_paths, seconds = [], []
    for seed in seeds:
        print(f"\n=== seed {seed} ({len(best_paths) + 1} of {len(seeds)}), in {base / f'seed_{seed}'}")
        run_cfg = SimpleNamespace(**{**vars(cfg), **shared, "SEED": seed, "CHECKPOINT_DIR": str(base / f"seed_{seed}")})
        if cfg.RESUME and not (Path(run_cfg.CHECKPOINT_DIR) / LAST_NAME).exists():
            print(f"note: no {LAST_NAME} in {run_cfg.CHECKPOINT_DIR} to resume; seed {seed} starts from the beginning")
            run_cfg.RESUME = False  # --resume after a stop: the seeds not reached yet start from scratch
        started = time.time()
        best_paths.append(train(run_cfg))
        seconds.append(time.time() - started)
    rows = []
    for seed, path in zip(seeds, best_paths):
        metrics = read_checkpoint(path)["metrics"]
        rows.append([seed, metrics["epoch"]] + [float(metrics[m]) for m in SEED_SUMMARY_METRICS])
    values = np.array([row[2:] for row in rows], dtype=np.float64)
    spread = np.std(values, axis=0, ddof=1) if len(rows) > 1 else np.full(values.shape[1], np.nan)
    print(f"\nvalidation metrics of the best epoch of each seed ({len(seeds)} runs):")
    print(format_table(["seed", "epoch"] + list(SEED_SUMMARY_METRICS),
                       rows + [["mean", ""] + values.mean(axis=0).tolist(), ["std", ""] + spread.tolist()]))
    print("time per seed: " + ", ".join(f"{t:.0f} s" for t in seconds)
          + (" (the first fills the feature cache)" if cfg.CACHE_FEATURES else ""))
    print("Each run chose its epoch on these validation images; test them together with "
          f"`python rine_plus_ssca.py eval --ckpt {base}/seed_*/{BEST_NAME} --data <test folder>`.")
    return best_paths
