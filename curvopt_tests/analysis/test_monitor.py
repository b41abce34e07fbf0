"""CurvatureMonitor: the same numbers as direct calls, CSV, every=k, state left as found, plot, bad input."""

import copy
import math
import sys

import pytest
import torch
from torch import nn

import curvopt
from curvopt.analysis import CurvatureMonitor
from curvopt.errors import EmptyDataError, MissingDependencyError, OptionError, UnknownCurvatureError
from curvopt_tests.problems import reference_hessian

PROBES = 12  # trace products per check: enough to exercise Hutch++, cheap on two cores


def _problem(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(dropout), nn.Linear(5, 3))
    model = model.double()
    with torch.no_grad():  # running statistics away from their defaults, so that eval and train mode differ
        model(torch.randn(64, 4, dtype=torch.float64) * 2 + 1)
    X = torch.randn(24, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    return model, nn.CrossEntropyLoss(), [(X[:16], y[:16]), (X[16:], y[16:])]


def _direct(model, loss_fn, probe, *, train=False, seed=0):
    """The analysis functions called by hand on a copy of the model, in the measured mode."""
    ref = copy.deepcopy(model).train(train)
    op = curvopt.curvature("hessian", ref, loss_fn, probe, cache=True)
    eig = curvopt.top_eigenvalues(op, 1, 1e-3, seed=seed)
    est = curvopt.trace(op, PROBES, per_block=True, seed=seed)
    return eig, est


def _dense_hessian(model, loss_fn, probe):
    """Reverse-over-reverse Hessian of the mean loss over the probe (every sample weighted equally)."""
    return reference_hessian(model, loss_fn, torch.cat([b[0] for b in probe]), torch.cat([b[1] for b in probe]))


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()], torch.get_rng_state())


def _assert_state(model, before):
    params_buffers, modes, rng = before
    after = model.state_dict()
    assert after.keys() == params_buffers.keys()
    for k, v in params_buffers.items():
        assert torch.equal(after[k], v), k
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("user_train", [True, False])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_values_equal_direct_calls_and_state_is_untouched(mode, user_train):
    model, loss_fn, probe = _problem(dropout=0.3)
    # the user's training mode: train-mode BatchNorm (would update its statistics) and dropout; or eval mode
    model.train(user_train)
    if mode == "train":
        model[3].p = 0.0  # the direct reference below seeds no dropout mask; the mask is the operator's business
    before = _state(model)
    mon = CurvatureMonitor(model, loss_fn, probe, probes=PROBES, mode=mode)
    record = mon.step(0)
    _assert_state(model, before)
    eig, est = _direct(model, loss_fn, probe, train=mode == "train")
    assert record["top_eigenvalue"] == pytest.approx(float(eig.eigenvalues[0]), rel=1e-12)
    assert record["top_eigenvalue_residual"] == pytest.approx(float(eig.residuals[0]), rel=1e-9, abs=1e-14)
    assert record["trace"] == pytest.approx(est.value, rel=1e-12)
    assert record["trace_stderr"] == pytest.approx(est.stderr, rel=1e-12)
    assert set(est.blocks) == {"0", "1", "4"}
    for name, (value, stderr) in est.blocks.items():
        assert record[f"trace/{name}"] == pytest.approx(value, rel=1e-12)
        assert record[f"trace_stderr/{name}"] == pytest.approx(stderr, rel=1e-12)
    assert record["products"] == eig.iterations + est.probes
    assert record["probe_seconds"] > 0
    # eval and train mode measure different matrices here (running vs batch statistics)
    other, _ = _direct(model, loss_fn, probe, train=mode != "train")
    assert abs(float(other.eigenvalues[0]) - record["top_eigenvalue"]) > 1e-3


def test_train_mode_with_dropout_is_one_fixed_matrix_and_leaves_rng():
    model, loss_fn, probe = _problem(dropout=0.3)
    model.train()
    before = _state(model)
    mon = CurvatureMonitor(model, loss_fn, probe, probes=PROBES, mode="train")
    first, second = mon.step(0), mon.step(1)
    _assert_state(model, before)
    for k in first:
        if k not in ("epoch", "check", "probe_seconds"):
            assert first[k] == second[k], k


def test_top_eigenvalue_against_dense_hessian():
    model, loss_fn, probe = _problem()
    model.eval()
    P = sum(p.numel() for p in model.parameters())
    mon = CurvatureMonitor(model, loss_fn, probe, quantities=("top_eigenvalue",), tol=1e-10, max_iter=P)
    record = mon.step()
    H = _dense_hessian(model, loss_fn, probe)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert record["top_eigenvalue"] == pytest.approx(top, rel=1e-7)
    assert record["top_eigenvalue_residual"] < 1e-6 * max(1.0, abs(top))
    assert "trace" not in record and "trace/0" not in record


def test_every_k_measures_at_calls_0_k_2k():
    model, loss_fn, probe = _problem()
    mon = CurvatureMonitor(model, loss_fn, probe, every=3, quantities=("trace",), probes=3)
    returned = [mon.step(epoch, lr=0.1) for epoch in range(7)]
    assert [r is not None for r in returned] == [True, False, False, True, False, False, True]
    assert [r["epoch"] for r in mon.history] == [0, 3, 6]
    assert [r["check"] for r in mon.history] == [0, 1, 2]
    assert mon.calls == 7
    # epoch defaults to the call index; measure() forces a check between two
    mon2 = CurvatureMonitor(model, loss_fn, probe, every=2, quantities=("trace",), probes=3)
    assert mon2() is not None and mon2() is None and mon2()["epoch"] == 2
    assert mon2.measure(2.5)["epoch"] == 2.5
    assert len(mon2.history) == 3


def test_csv_round_trip_header_once_and_append(tmp_path):
    model, loss_fn, probe = _problem()
    path = tmp_path / "runs" / "curvature.csv"
    mon = CurvatureMonitor(model, loss_fn, probe, probes=PROBES, path=path)
    mon.step(0, batch_size=32, lr=torch.tensor(0.5))
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # a training step between checks
    mon.step(1, batch_size=64)  # lr not given this time: an empty cell
    rows = CurvatureMonitor.read_csv(path)
    assert len(rows) == 2
    for row, record in zip(rows, mon.history):
        assert list(row) == list(record)
        for k, v in record.items():
            assert row[k] == v, k  # floats written by repr come back bit for bit
    assert rows[0]["lr"] == 0.5 and rows[1]["lr"] is None
    assert rows[0]["top_eigenvalue"] != rows[1]["top_eigenvalue"]
    # a resumed run with the same columns appends; the header stays a single line
    again = CurvatureMonitor(model, loss_fn, probe, probes=PROBES, path=path)
    again.step(2, batch_size=128, lr=0.25)
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("epoch,check,batch_size,lr,top_eigenvalue,")
    assert sum(line.startswith("epoch,") for line in lines) == 1
    assert CurvatureMonitor.read_csv(path)[2]["epoch"] == 2
    # other columns into the same file: refused, file unchanged
    text = path.read_text()
    other = CurvatureMonitor(model, loss_fn, probe, quantities=("trace",), probes=3, path=path)
    with pytest.raises(OptionError, match="other columns"):
        other.step(3)
    assert path.read_text() == text


def test_extra_columns_fixed_at_first_check():
    model, loss_fn, probe = _problem()
    mon = CurvatureMonitor(model, loss_fn, probe, quantities=("trace",), probes=3)
    mon.step(0, batch_size=32)
    with pytest.raises(OptionError, match="lr"):
        mon.step(1, batch_size=32, lr=0.1)
    assert len(mon.history) == 1
    with pytest.raises(OptionError, match="trace"):
        CurvatureMonitor(model, loss_fn, probe, quantities=("trace",), probes=3).step(0, trace=1.0)


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    model, loss_fn, probe = _problem()
    mon = CurvatureMonitor(model, loss_fn, probe, quantities=("top_eigenvalue",))
    with pytest.raises(EmptyDataError, match="no check"):
        mon.plot(tmp_path / "empty.png")
    for epoch, bs in enumerate([32, 32, 64]):
        mon.step(epoch, batch_size=bs, lr=0.1 * bs / 32)
    out = mon.plot(tmp_path / "figs" / "schedule.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_pip_line(tmp_path, monkeypatch):
    model, loss_fn, probe = _problem()
    mon = CurvatureMonitor(model, loss_fn, probe, quantities=("trace",), probes=3)
    mon.step(0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'curvopt\[plot\]'"):
        mon.plot(tmp_path / "x.png")


def test_non_finite_model_records_nan_and_warns():
    model, loss_fn, probe = _problem()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    mon = CurvatureMonitor(model, loss_fn, probe, probes=3)
    with pytest.warns(RuntimeWarning, match="CurvatureMonitor"):
        record = mon.step(0)
    assert math.isnan(record["top_eigenvalue"]) and math.isnan(record["trace"])
    assert len(mon.history) == 1


@pytest.mark.parametrize("every", [0, -2, 1.5, True])
def test_bad_every(every):
    model, loss_fn, probe = _problem()
    with pytest.raises(OptionError, match="every"):
        CurvatureMonitor(model, loss_fn, probe, every=every)


def test_bad_quantity_mode_curvature_option():
    model, loss_fn, probe = _problem()
    with pytest.raises(OptionError, match="top_eigenvalue, trace, per_layer_trace") as e:
        CurvatureMonitor(model, loss_fn, probe, quantities=("trace", "top_eigenvalues"))
    assert "'top_eigenvalues'" in str(e.value)
    with pytest.raises(OptionError, match="valid: eval, train"):
        CurvatureMonitor(model, loss_fn, probe, mode="inference")
    with pytest.raises(OptionError, match="probes"):
        CurvatureMonitor(model, loss_fn, probe, probes=0)
    with pytest.raises(OptionError, match="hutchinson, hutchpp"):
        CurvatureMonitor(model, loss_fn, probe, trace_method="girard")
    with pytest.raises(UnknownCurvatureError, match="valid names"):
        CurvatureMonitor(model, loss_fn, probe, curvature="hessain")
    with pytest.raises(OptionError, match="mc_sample"):
        CurvatureMonitor(model, loss_fn, probe, curvature="hessian", mc_sample=3)


@pytest.mark.parametrize("which", ["empty batch", "no batches", "only empty batches"])
def test_empty_probe_data(which):
    model, loss_fn, probe = _problem()
    X, y = probe[0]
    data = {"empty batch": (X[:0], y[:0]), "no batches": [],
            "only empty batches": [(X[:0], y[:0]), (X[:0], y[:0])]}[which]
    with pytest.raises(EmptyDataError, match=r"CurvatureMonitor\(probe_data=...\)"):
        CurvatureMonitor(model, loss_fn, data)
