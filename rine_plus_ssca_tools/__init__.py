"""Tools beside rine_plus_ssca.py: what is not the detector's algorithm, one module per concern.

    protocols      benchmark protocol files (protocols/*.json) for `eval --protocol`
    data_check     the check-data command
    bias_report    real/fake differences a detector could learn instead (check-data, training's warnings)
    rine_format    RINE's weight format: the import-rine and export commands, reading exported files
    heatmaps       where an image looks generated: explain, draw_explanation, `predict --explain`
    plots          training's and eval's pictures
    statistics     bootstrap intervals, mean +- std over checkpoints, paired comparison, McNemar's test
    compare        the compare command: is A better than B on the same images
    seeds          --seeds: one training run per seed, then the spread of their validation metrics
    feature_cache  CACHE_FEATURES: the frozen backbone's tokens on disk
    distributed    training under torchrun: the processes' joint decisions, DDP

Imports go one way: these modules import the script (rine_plus_ssca), the script imports a module only
inside the command that needs it, so rine_plus_ssca.py alone still trains, evaluates and predicts.
"""
