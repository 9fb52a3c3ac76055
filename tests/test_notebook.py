"""notebooks/quickstart.ipynb runs end to end (every code cell, in order)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_notebook_is_valid_and_has_no_stored_outputs():
    with open(NOTEBOOK, encoding="utf-8") as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] for c in code)
    # Shell lines would not run outside Jupyter; installs go through subprocess behind a check.
    assert not any(line.lstrip().startswith(("!", "%")) for c in code for line in c["source"])


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    env = dict(os.environ, QUICKSTART_OUTPUT_DIR=str(tmp_path / "quickstart"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts",
                                                        "run_notebook.py"), NOTEBOOK],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "CLoud - classic" in out and "critique:" in out
    results = json.loads((tmp_path / "quickstart" / "results.json").read_text())
    assert set(results["cloud"]["self_consistency"]) == {"1", "4"}


def _colab_install_cell(tmp_path, monkeypatch, repo):
    """The first code cell, run as on a fresh Colab runtime (google.colab imported, cwd /content):
    `git clone` writes a checkout (failing, as git does, into an existing directory) and pip is
    only recorded. Returns a function running the cell once, and the commands run."""
    import subprocess
    import types

    with open(NOTEBOOK, encoding="utf-8") as f:
        cell = "".join(next(c for c in json.load(f)["cells"] if c["cell_type"] == "code")["source"])
    calls = []

    def fake_run(cmd, check=False, **kwargs):
        calls.append(cmd)
        if cmd[:2] == ["git", "clone"]:
            dest = cmd[-1]
            if os.path.exists(dest):
                raise subprocess.CalledProcessError(128, cmd)
            os.makedirs(os.path.join(dest, "cloud_jax"))
            open(os.path.join(dest, "pyproject.toml"), "w").close()
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", fake_run)
    if repo is None:
        monkeypatch.delenv("CLOUD_JAX_REPO", raising=False)
    else:
        monkeypatch.setenv("CLOUD_JAX_REPO", repo)
    content = tmp_path / "content"
    content.mkdir()
    monkeypatch.chdir(content)
    return (lambda: exec(compile(cell, "quickstart[code cell 1]", "exec"),
                         {"__name__": "__main__"})), calls, content


def test_colab_install_cell_runs_again_without_cloning_twice(tmp_path, monkeypatch):
    run_cell, calls, content = _colab_install_cell(tmp_path, monkeypatch, "https://example.org/c")
    run_cell()
    assert os.getcwd() == str(content / "cloud_jax")
    run_cell()  # a second run, now inside the clone, fetches and installs nothing
    assert os.getcwd() == str(content / "cloud_jax")
    assert [c[:2] for c in calls].count(["git", "clone"]) == 1
    assert sum("pip" in c for c in calls) == 1


def test_colab_install_cell_without_a_repo_url_says_what_to_set(tmp_path, monkeypatch):
    run_cell, calls, _ = _colab_install_cell(tmp_path, monkeypatch, None)
    with pytest.raises(RuntimeError, match="CLOUD_JAX_REPO"):
        run_cell()
    assert calls == []  # no clone of a placeholder URL


def test_cells_import_names_that_exist_and_the_pipeline_cell_loads_its_config(monkeypatch):
    """Without running the pipeline (the slow test above does): every name a cell imports exists,
    and the pipeline cell's config with its overrides loads (a renamed key or function shows
    here, in the fast suite)."""
    import ast
    import importlib

    from cloud_jax.experiments.cloud_vs_classic import run as run_module
    from cloud_jax.experiments.cloud_vs_classic.config import PipelineConfig

    with open(NOTEBOOK, encoding="utf-8") as f:
        cells = ["".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    imported = 0
    for source in cells:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("cloud_jax"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), (node.module, alias.name)
                    imported += 1
    assert imported >= 8

    class Stop(Exception):
        pass

    seen = {}

    def fake_run_pipeline(cfg):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(run_module, "run_pipeline", fake_run_pipeline)
    monkeypatch.chdir(ROOT)
    pipeline_cell = next(s for s in cells if "run_pipeline(cfg)" in s)
    with pytest.raises(Stop):
        exec(compile(pipeline_cell, "pipeline cell", "exec"), {"os": os})
    cfg = seen["cfg"]
    assert isinstance(cfg, PipelineConfig) and cfg.evaluation.num_samples == (1, 4)
    assert cfg.stages.cloud.total_steps == 10
