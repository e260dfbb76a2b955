"""Tools beside rine_plus_ssca.py: what is not the detector's algorithm, one module per concern.

    protocols    benchmark protocol files (protocols/*.json) for `eval --protocol`
    data_check   the check-data command and its bias report
    rine_format  RINE's weight format: the import-rine and export commands
    heatmaps     where an image looks generated: explain, draw_explanation, `predict --explain`
    plots        eval's pictures: ROC/PR curves, reliability diagram, robustness curves

Imports go one way: these modules import the script (rine_plus_ssca), the script imports a module only
inside the command that needs it, so rine_plus_ssca.py alone still trains, evaluates and predicts.
"""
