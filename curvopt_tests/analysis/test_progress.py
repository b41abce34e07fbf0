"""One progress bar per estimator (counting its passes over the data), not one per product."""

import pytest
import torch
import tqdm.auto
from torch import nn

import curvopt


class RecordingBar:
    """Stands in for tqdm: records every bar made and how far it got."""

    made: list = []

    def __init__(self, iterable=None, **kwargs):
        self.iterable, self.kwargs, self.n = iterable, kwargs, 0
        RecordingBar.made.append(self)

    def __iter__(self):
        for x in self.iterable:
            self.n += 1
            yield x

    def update(self, k=1):
        self.n += k

    def close(self):
        pass


@pytest.fixture
def bars(monkeypatch):
    RecordingBar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    return RecordingBar.made


def _op(progress):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    data = [(X[:10], y[:10]), (X[10:20], y[10:20]), (X[20:], y[20:])]
    return model, data, curvopt.curvature("hessian", model, nn.CrossEntropyLoss(), data, progress=progress)


def test_each_estimator_shows_one_bar_counting_its_passes(bars):
    _, _, op = _op("hessian pass")
    res = curvopt.top_eigenvalues(op, k=2)
    assert len(bars) == 1 and bars[0].kwargs["unit"] == "pass"
    assert bars[0].n == res.iterations and "top-2 eigenvalues" in bars[0].kwargs["desc"]
    curvopt.trace(op, probes=9)
    curvopt.spectral_density(op, probes=2, steps=5)
    assert [b.kwargs["desc"].split(" (")[0] for b in bars] == ["top-2 eigenvalues", "trace", "spectral density"]
    assert bars[2].n == 2 * 5


def test_a_product_outside_an_estimator_keeps_its_own_bar_over_batches(bars):
    _, _, op = _op(True)
    op @ torch.randn(op.shape[0])
    assert len(bars) == 1 and bars[0].n == 3  # three batches


def test_sensitivity_shows_one_bar(bars):
    model, data, _ = _op(False)
    curvopt.sensitivity(model, data, nn.CrossEntropyLoss(), probes=6, progress=True)
    assert len(bars) == 1 and bars[0].n > 1


def test_no_progress_no_bar(bars):
    _, _, op = _op(False)
    curvopt.top_eigenvalues(op)
    assert bars == []
