"""The notebooks, executed end to end with nbclient against a checkpoint trained here: the English one
(notebooks/inference.ipynb) where it ships, in notebooks/, and the Chinese one (notebooks/inference.zh-CN.ipynb)
copied to a folder outside the project, which finds the project the way `pip install -e .` or PYTHONPATH
makes it importable.

The project root is rebuilt in tmp: a copy of rine_plus_ssca.py and rine_plus_ssca_tools/, a small tree laid
out like the demo's data/demo/{train,val,test}, and a checkpoint trained into checkpoints/demo/ with the demo's
relative backbone path, as `--demo` leaves them, with a TARGET_FPR threshold, so that a verdict drawn at 0.5
instead of the stored threshold shows.
"""

import os
import re
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

import rine_plus_ssca as rps
from conftest import REPO, run_main, save_tiny_backbone, write_demo_tree

NOTEBOOKS = {"en": REPO / "notebooks" / "inference.ipynb", "zh": REPO / "notebooks" / "inference.zh-CN.ipynb"}
# What each notebook prints: its verdict words, and the labels of the checkpoint and top-blocks lines.
PRINTED = {"en": dict(fake="fake", real="real", checkpoint="checkpoint: ", threshold="threshold: ", top="top blocks: "),
           "zh": dict(fake="假图", real="真图", checkpoint="检查点： ", threshold="阈值： ", top="最重要的编码器块： ")}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebook_root")
    shutil.copy(REPO / "rine_plus_ssca.py", root / "rine_plus_ssca.py")
    shutil.copytree(REPO / "rine_plus_ssca_tools", root / "rine_plus_ssca_tools", ignore=shutil.ignore_patterns("__pycache__"))
    write_demo_tree(root / "data/demo", {"train": {"nearest": 8, "bilinear": 8}, "val": {"nearest": 4, "bilinear": 4},
                                         "test": {"nearest": 2, "bilinear": 2, "transposed_conv": 2}}, seed=7)
    backbone = "checkpoints/demo/tiny_clip_backbone"  # relative, as the demo records it
    save_tiny_backbone(root / backbone, seed=0)
    # The command line's training, in this process (the notebooks, not training, are what this file tests).
    trained = run_main(["--data-dir", "data/demo", "--checkpoint-dir", "checkpoints/demo", "--clip-model", backbone,
                        "--epochs", "1", "--batch-size", "16", "--proj-dim", "32", "--spec-channels", "16",
                        "--fusion-dim", "32", "--fusion-heads", "4", "--num-workers", "0", "--device", "cpu",
                        "--target-fpr", "0.25"], cwd=root)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert (root / "checkpoints/demo" / rps.BEST_NAME).is_file()
    model = rps.load_detector(root / "checkpoints/demo" / rps.BEST_NAME, device="cpu")
    threshold, note = rps.decision_threshold(model)
    assert note is not None and threshold != model.config["THRESHOLD"]  # the stored one: the test below can tell
    return dict(root=root, threshold=threshold)


@pytest.fixture(scope="module", params=sorted(NOTEBOOKS), ids=lambda language: language)
def executed(request, project, tmp_path_factory):
    language, root = request.param, project["root"]
    if language == "en":  # where it ships
        folder, python_path = root / "notebooks", ""
    else:  # anywhere else, the project importable as `pip install -e .` (or PYTHONPATH) makes it
        folder, python_path = tmp_path_factory.mktemp("my_notebooks"), str(root)
    folder.mkdir(exist_ok=True)
    shutil.copy(NOTEBOOKS[language], folder / NOTEBOOKS[language].name)

    # The kernel inherits this environment: offline (conftest), one thread, no files outside tmp.
    saved = dict(os.environ)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      PYTHONDONTWRITEBYTECODE="1", JUPYTER_RUNTIME_DIR=str(root / ".jupyter_runtime"),
                      IPYTHONDIR=str(root / ".ipython"), MPLCONFIGDIR=str(root / ".matplotlib"), PYTHONPATH=python_path)
    try:
        notebook = nbformat.read(folder / NOTEBOOKS[language].name, as_version=4)
        client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}})
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        os.environ.clear()
        os.environ.update(saved)
    n_test = len(list((root / "data/demo/test").rglob("*.png")))
    return dict(root=root, notebook=notebook, n_test=n_test, language=language, threshold=project["threshold"])


def outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def printed_text(notebook):
    return "".join(o.get("text", "") for o in outputs(notebook) if o.output_type == "stream" and o.get("name") == "stdout")


def test_notebook_runs_without_errors(executed):
    code_cells = [cell for cell in executed["notebook"].cells if cell.cell_type == "code"]
    assert code_cells and all(cell.get("execution_count") for cell in code_cells), "a cell did not run"
    errors = [o for o in outputs(executed["notebook"]) if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    stderr = "".join(o.get("text", "") for o in outputs(executed["notebook"]) if o.get("name") == "stderr")
    assert "Traceback" not in stderr, stderr
    assert "IProgress not found" not in stderr, stderr  # tqdm's warning when ipywidgets is missing: noise for a beginner


def test_notebook_shows_the_image_grid_and_the_tie_plot(executed):
    images = [o for o in outputs(executed["notebook"]) if "image/png" in o.get("data", {})]
    assert len(images) >= 2, [o.output_type for o in outputs(executed["notebook"])]
    # One picture in the cell that draws the grid, one in the cell that plots the TIE importances.
    cells_with_images = [cell.source for cell in executed["notebook"].cells if cell.cell_type == "code"
                         and any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))]
    assert any("imshow" in source for source in cells_with_images)
    assert any("explain(" in source for source in cells_with_images)  # the heatmaps of the example images
    assert any("block_importance" in source for source in cells_with_images)


def test_notebook_prints_scores_in_unit_interval_and_calls_them_at_the_stored_threshold(executed):
    text, words = printed_text(executed["notebook"]), PRINTED[executed["language"]]
    assert words["checkpoint"] + "checkpoints/demo/" + rps.BEST_NAME in text, text
    score_line = re.compile(rf"^(\d+\.\d{{3}})  ({words['real']}|{words['fake']})  (\S+)$")
    scores = [score_line.match(line) for line in text.splitlines()]
    scores = [m for m in scores if m]
    assert len(scores) == min(8, executed["n_test"]), text
    threshold = executed["threshold"]  # the TARGET_FPR threshold training stored, not 0.5
    assert words["threshold"] + f"{threshold:.4g}" in text.splitlines(), text
    for match in scores:
        p = float(match.group(1))
        assert 0.0 <= p <= 1.0, match.group(0)
        assert match.group(3).startswith("data/demo/test/") and (executed["root"] / match.group(3)).is_file()
        if abs(p - threshold) > 1e-3:
            assert match.group(2) == (words["fake"] if p >= threshold else words["real"]), (match.group(0), threshold)
    top = [line for line in text.splitlines() if line.startswith(words["top"])]
    assert len(top) == 1
    importances = [float(v) for v in re.findall(r"\((\d\.\d{3})\)", top[0])]
    assert importances and importances == sorted(importances, reverse=True)
