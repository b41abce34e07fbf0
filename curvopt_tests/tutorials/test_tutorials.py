"""Every tutorial runs start to finish, so none of them rots."""

import os
import pathlib
import runpy
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9]*.py"))


def test_there_are_tutorials():
    assert TUTORIALS, "no tutorials found"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, capsys):
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "max |H_op - H_dense|" in out or out.strip(), f"{path.name} printed nothing"


def test_docs_build_offline(tmp_path):
    pytest.importorskip("sphinx")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path)],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "curvature.html").exists()
    assert "HessianOperator" in (tmp_path / "curvature.html").read_text()
    assert "sensitivity" in (tmp_path / "analysis.html").read_text()
