"""The first tutorial's dense comparison really agrees (not just runs)."""

import pathlib
import runpy

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_tutorial_01_operator_matches_dense():
    ns = runpy.run_path(str(ROOT / "tutorials" / "01_curvature_operators.py"))
    torch.testing.assert_close(ns["H_op"], ns["H_dense"], rtol=1e-9, atol=1e-11)
    assert torch.linalg.eigvalsh(ns["G"])[0] > -1e-10
    torch.testing.assert_close(ns["step"], ns["dense_step"], rtol=1e-6, atol=1e-8)
