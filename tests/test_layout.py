"""The layout: rine_plus_ssca.py holds the detector, rine_plus_ssca_tools/ beside it holds the tools.

Imports go one way (the package imports the script; the script imports a module of the package only inside
the command that needs it), and a copy of the script alone says in one line what a command needs from the
package when it is absent.
"""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import rine_plus_ssca as rps
from conftest import REPO, SCRIPT, nonempty_lines, run_copied_script, run_script

PACKAGE = REPO / "rine_plus_ssca_tools"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")
STANDALONE = {"bias_report"}  # reads file headers only: imports nothing of the project
MISSING = "needs the folder rine_plus_ssca_tools/ beside rine_plus_ssca.py"


def imported_names(tree, top_level_only):
    """Module names of the import statements in an ast tree (top_level_only: outside functions and classes)."""
    if top_level_only:
        pending, nodes = list(tree.body), []
        while pending:
            node = pending.pop()
            nodes.append(node)
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                pending += list(ast.iter_child_nodes(node))
    else:
        nodes = list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_the_package_imports_the_script_and_the_script_never_imports_the_package_at_import_time(tmp_path):
    script_imports = imported_names(ast.parse(SCRIPT.read_text(encoding="utf-8")), top_level_only=True)
    assert not [name for name in script_imports if name.split(".")[0] == "rine_plus_ssca_tools"], script_imports
    assert {"distributed", "seeds", "plots", "heatmaps", "protocols"} <= set(MODULES), MODULES
    for module in MODULES:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
        imports = imported_names(tree, top_level_only=True)
        assert ("rine_plus_ssca" in imports or "rine_plus_ssca_tools" in imports) != (module in STANDALONE), module
    # Importing the script loads nothing of the package; a command's module is loaded when asked for.
    code = ("import sys, rine_plus_ssca as m\n"
            "tools = lambda: sorted(n for n in sys.modules if n.split('.')[0] == 'rine_plus_ssca_tools')\n"
            "print(tools())\n"
            "heatmaps = m.tools_module('heatmaps', 'predict --explain')\n"
            "print(tools(), callable(heatmaps.explain))\n")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "['rine_plus_ssca_tools', 'rine_plus_ssca_tools.heatmaps'] True"]


def test_a_tool_command_run_from_the_command_line_reports_a_mistake_in_one_line(tmp_path):
    # The package's modules import rine_plus_ssca; run as a script, that must be this run's module (whose
    # main catches UserError), not a second copy of it with its own UserError and a traceback.
    result = run_script(["import-rine", "--ckpt", "missing.pth", "--out", "out.pth"], cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: No file missing.pth"), result.stderr


def alone(tmp_path):
    """A folder holding a copy of rine_plus_ssca.py and nothing else."""
    shutil.copy(SCRIPT, tmp_path / SCRIPT.name)
    return tmp_path


def test_check_data_without_the_package_says_so_in_one_line(demo, tmp_path):
    cwd, _ = demo
    result = run_copied_script(["check-data", "--data", cwd / "data/demo/train", "--workers", "1"], cwd=alone(tmp_path))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout == ""
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: check-data {MISSING}") and "pip install -e ." in lines[0], \
        result.stderr


def test_predict_explain_without_the_package_says_so_in_one_line_before_scoring(demo, tmp_path):
    cwd, result = demo
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = run_copied_script(["predict", "--ckpt", cwd / "checkpoints/demo" / rps.BEST_NAME,
                                cwd / "data/demo/test/bilinear", "--num-workers", "0", "--explain", "maps"],
                               cwd=alone(tmp_path))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: predict --explain {MISSING}"), result.stderr
    assert "P(fake)" not in result.stdout and not (tmp_path / "maps").exists()


def test_eval_protocol_without_the_package_says_so_in_one_line(demo, tmp_path):
    cwd, _ = demo
    result = run_copied_script(["eval", "--ckpt", cwd / "checkpoints/demo" / rps.BEST_NAME, "--data",
                                cwd / "data/demo/test", "--protocol", REPO / "protocols/rine20.json"],
                               cwd=alone(tmp_path))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: eval --protocol {MISSING}"), result.stderr


def test_eval_without_the_package_writes_its_tables_and_says_in_one_line_that_the_pictures_need_it(demo, tmp_path):
    cwd, result = demo
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = run_copied_script(["eval", "--ckpt", cwd / "checkpoints/demo" / rps.BEST_NAME, "--data",
                                cwd / "data/demo/test", "--max-per-class", "2", "--num-workers", "0", "--out", "out"],
                               cwd=alone(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if MISSING in line]
    pictures = "note: drawing eval's pictures and intervals"
    assert len(notes) == 1 and notes[0].startswith(pictures), result.stdout[-3000:]
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    # the script writes the tables and the per-image scores; every picture is the package's
    assert written == ["eval_test_max2-seed0.csv", "eval_test_max2-seed0.md", "eval_test_max2-seed0_scores.csv"], written


def test_torchrun_and_seeds_without_the_package_say_so_in_one_line_before_reading_data(tmp_path):
    # torchrun sets WORLD_SIZE in each process it starts; the copy alone refuses before joining any group.
    for args, env, needed_by in ((["--data-dir", "nowhere"], {"WORLD_SIZE": "2"}, "Training under torchrun"),
                                 (["--data-dir", "nowhere", "--seeds", "0,1"], {}, "--seeds")):
        result = run_copied_script(args, cwd=alone(tmp_path), env_extra=env)
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
        lines = nonempty_lines(result.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"error: {needed_by} {MISSING}"), result.stderr
        assert "nowhere" not in result.stdout + result.stderr  # refused before the data folder is looked at


def test_the_project_installs_and_both_import_from_any_folder(tmp_path):
    # pyproject.toml: a script or notebook outside the project imports the script and its tools once the
    # project is installed (`pip install -e .`; here a plain install into a folder, offline, to check what
    # the package holds).
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                             "--no-index", "--target", str(target), str(REPO)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import rine_plus_ssca, rine_plus_ssca_tools.heatmaps as h; "
            "print(rine_plus_ssca.__file__); print(h.__file__)")
    imported = subprocess.run([sys.executable, "-I", "-c", code, str(target)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert all(Path(line).is_relative_to(target) for line in imported.stdout.split()), imported.stdout
