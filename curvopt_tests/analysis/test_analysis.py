"""Analysis API on small float64 models, against dense matrices."""

import copy
import math

import pytest
import torch
from hypothesis import given
from torch import nn

import curvopt
from curvopt.errors import QuantizationError
from curvopt.quant import Quantizer
from curvopt_tests.problems import dense_hessian, problems


@given(pb=problems(kinds=("mlp", "cnn1d"), losses=("ce", "mse")))
def test_top_eigenvalues_match_dense(pb):
    op = curvopt.curvature("hessian", pb.model, pb.loss_fn, pb.data, cache=True)
    H = dense_hessian(pb)
    k = min(2, op.shape[0])
    res = curvopt.top_eigenvalues(op, k, tol=1e-10, max_iter=op.shape[0])
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:k], rtol=1e-6, atol=1e-8)
    bottom = curvopt.top_eigenvalues(op, 1, tol=1e-10, which="smallest", max_iter=op.shape[0])
    assert abs(float(bottom.eigenvalues[0] - torch.linalg.eigvalsh(H)[0])) < 1e-6


def _small_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    return model, nn.CrossEntropyLoss(), list(zip(X.split(8), y.split(8))), X, y


def test_trace_per_block_unbiased_against_exact_block_traces():
    model, loss_fn, data, X, y = _small_problem()
    op = curvopt.curvature("hessian", model, loss_fn, data, cache=True)
    H = op.to_dense()
    sizes = [p.numel() for p in op.params]
    cut = sizes[0] + sizes[1]
    exact = {"0": float(H.diagonal()[:cut].sum()), "2": float(H.diagonal()[cut:].sum())}
    runs = [curvopt.trace(op, 12, per_block=True, seed=s) for s in range(100)]
    for r in runs:
        assert math.isclose(sum(v for v, _ in r.blocks.values()), r.value, rel_tol=1e-9, abs_tol=1e-12)
    for name, ex in exact.items():
        vals = torch.tensor([r.blocks[name][0] for r in runs])
        assert abs(float(vals.mean()) - ex) < 4 * float(vals.std()) / 10 + 1e-9
    values = torch.tensor([r.value for r in runs])
    assert abs(float(values.mean()) - float(H.trace())) < 4 * float(values.std()) / 10 + 1e-9


def test_spectral_density_covers_the_spectrum():
    model, loss_fn, data, *_ = _small_problem()
    op = curvopt.curvature("ggn", model, loss_fn, data, cache=True)
    ev = torch.linalg.eigvalsh(op.to_dense())
    grid, dens = curvopt.spectral_density(op, probes=3, steps=op.shape[0], grid_size=2000)
    assert float(grid[0]) <= float(ev[0]) + 1e-8 and float(grid[-1]) >= float(ev[-1]) - 1e-8
    assert abs(float(torch.trapezoid(dens, grid)) - 1) < 1e-2


class _Net(nn.Module):
    """A frozen first layer, a layer never used in forward, and dropout (train/eval)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5))
        self.unused = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.features[0].weight.requires_grad_(False)
        self.features[0].bias.requires_grad_(False)

    def forward(self, x):
        return self.head(self.features(x))


def test_sensitivity_with_frozen_and_unused_layers_restores_modes():
    torch.manual_seed(0)
    model = _Net().double()
    model.train()
    model.features.eval()  # a mixed mode must come back exactly
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    before = copy.deepcopy(model.state_dict())
    modes = {n: m.training for n, m in model.named_modules()}
    report = curvopt.sensitivity(model, [(X[:12], y[:12]), (X[12:], y[12:])], probes=60, bits=4)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
    assert report["features.0"].status == "frozen"
    assert report["unused"].status == "unused"
    assert report.ranking() == ["head"]
    head = report["head"]
    assert head.numel == 21 and head.status == "ok"
    # exact trace of the head block in eval mode (dropout off)
    model.eval()
    ref = curvopt.curvature("hessian", model, nn.CrossEntropyLoss(), (X, y), params=["head.weight", "head.bias"])
    exact = float(ref.to_dense().trace())
    assert abs(head.trace - exact) <= 4 * head.trace_se + 1e-9
    assert math.isclose(head.avg_trace, head.trace / 21)
    # the score's block is the weight alone (only the weight is quantized): exact weight-block trace
    ref_w = curvopt.curvature("hessian", model, nn.CrossEntropyLoss(), (X, y), params=["head.weight"])
    assert abs(head.weight_trace - float(ref_w.to_dense().trace())) <= 4 * head.weight_trace_se + 1e-9
    assert math.isclose(head.weight_avg_trace, head.weight_trace / 18)
    assert math.isclose(head.hawq_score, head.weight_avg_trace * head.perturbation)
    d = report.to_dict()
    assert d["layers"]["unused"]["status"] == "unused" and d["ranking"] == ["head"]
    text = str(report)
    assert "frozen" in text and "unused" in text and "head" in text


def test_sensitivity_top_eigenvalue_per_layer():
    model, loss_fn, data, X, y = _small_problem(1)
    report = curvopt.sensitivity(model, data, probes=30, top_eigenvalue=True)
    for name, pnames in [("0", ["0.weight", "0.bias"]), ("2", ["2.weight", "2.bias"])]:
        H = curvopt.curvature("hessian", model, loss_fn, data, params=pnames).to_dense()
        assert math.isclose(report[name].top_eigenvalue, float(torch.linalg.eigvalsh(H)[-1]), rel_tol=1e-2)


def test_quantize_symmetric_per_channel():
    w = torch.randn(5, 7, dtype=torch.float64)
    quantize_symmetric = Quantizer(clipping="minmax").quantize
    for bits in (2, 4, 8):
        q = quantize_symmetric(w, bits)
        levels = 2 ** (bits - 1) - 1
        scale = w.abs().amax(1, keepdim=True) / levels
        assert ((q - w).abs() <= scale / 2 + 1e-12).all()
        assert (torch.round(q / scale).abs() <= levels).all()
        torch.testing.assert_close(q.abs().amax(1), w.abs().amax(1))  # channel max is a level
    with pytest.raises(QuantizationError, match="bits"):  # a ValueError
        quantize_symmetric(w, 1)


def test_landscape_1d_along_top_eigenvector_and_model_unchanged():
    model, loss_fn, data, X, y = _small_problem(2)
    before = copy.deepcopy(model.state_dict())
    op = curvopt.curvature("hessian", model, loss_fn, data, cache=True)
    top = curvopt.top_eigenvalues(op, 1, tol=1e-10, max_iter=op.shape[0])
    h = 1e-3
    land = curvopt.loss_landscape(model, loss_fn, data, [top.eigenvectors[:, 0]], steps=3, radius=h)
    assert land.dims == 1 and land.losses.shape == (3,)
    with torch.no_grad():
        assert math.isclose(float(land.losses[1]), float(loss_fn(model(X), y)), rel_tol=1e-12)
    curvature_along = float(land.losses[0] - 2 * land.losses[1] + land.losses[2]) / h**2
    assert math.isclose(curvature_along, float(top.eigenvalues[0]), rel_tol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))


def test_landscape_2d_and_filter_normalized_direction():
    model, loss_fn, data, *_ = _small_problem(3)
    d = curvopt.random_direction(model, seed=0)
    parts = d.split([p.numel() for p in model.parameters()])
    for part, p in zip(parts, model.parameters()):
        part = part.reshape(p.shape)
        if p.dim() == 1:
            assert (part == 0).all()
        else:
            torch.testing.assert_close(part.norm(dim=1), p.detach().norm(dim=1))
    land = curvopt.loss_landscape(model, loss_fn, data, [d, curvopt.random_direction(model, seed=1)], steps=3)
    assert land.dims == 2 and land.losses.shape == (3, 3)
    with pytest.raises(curvopt.errors.ShapeError, match="expected"):
        curvopt.loss_landscape(model, loss_fn, data, [d[:-1]])


@pytest.mark.optional
def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    from curvopt.analysis.plots import plot_landscape, plot_spectral_density

    model, loss_fn, data, *_ = _small_problem()
    op = curvopt.curvature("ggn", model, loss_fn, data)
    grid, dens = curvopt.spectral_density(op, probes=1, steps=10)
    p1 = plot_spectral_density(grid, dens, tmp_path / "density.png")
    land = curvopt.loss_landscape(model, loss_fn, data, [curvopt.random_direction(model)] * 2, steps=3)
    p2 = plot_landscape(land, tmp_path / "land.png")
    for p in (p1, p2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
