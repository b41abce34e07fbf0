"""The peers benchmark: its float64 reference is right, ``--quick`` runs with no peer installed, and (optional)
the peer rows are filled and flag a wrong answer when the peers are installed."""

import argparse
import importlib.util
import json

import pytest
import torch
from torch import nn

from curvopt.models import mlp, transformer
from curvopt_tests.benchmarks import load_benchmark

PEERS = ("curvlinops", "hessian_eigenthings", "pyhessian")


@pytest.fixture(scope="module")
def peers():
    return load_benchmark("peers")


def tiny_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = mlp((6, 5, 4, 3), activation=nn.Tanh).eval()
    batches = [(torch.randn(7, 6), torch.randint(0, 3, (7,))), (torch.randn(4, 6), torch.randint(0, 3, (4,)))]
    return model, batches


def dense_ggn(model, batches):
    """``sum_b (n_b / N) J_b^T H_out J_b`` from dense Jacobians, float64."""
    params = list(model.parameters())
    N = sum(len(y) for _, y in batches)
    names = [n for n, _ in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    total = 0
    for X, y in batches:
        def f(flat, X=X):
            ps, i = {}, 0
            for n, p in zip(names, params):
                ps[n] = flat[i:i + p.numel()].view_as(p)
                i += p.numel()
            return torch.func.functional_call(model, ps, (X,)).reshape(-1)
        J = torch.autograd.functional.jacobian(f, flat0)
        out = f(flat0).detach()
        Hout = torch.autograd.functional.hessian(
            lambda o, y=y: nn.functional.cross_entropy(o.view(len(y), -1), y), out)
        total = total + J.T @ Hout @ J * (len(y) / N)
    return total


def test_reference_products_match_dense_matrices(peers):
    model, batches = tiny_problem()
    ref = peers.Reference(model, nn.CrossEntropyLoss(), batches, reference_probes=3)
    H = ref.dense()
    assert H is not None and H.dtype == torch.float64
    v = torch.randn(ref.P, dtype=torch.float64)
    torch.testing.assert_close(ref.hvp(v), H @ v, rtol=1e-10, atol=1e-12)
    G = dense_ggn(ref.model, ref.batches)
    torch.testing.assert_close(ref.ggnvp(v), G @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref.top(3), torch.linalg.eigvalsh(H).flip(0)[:3])
    ref._dense = None  # the matrix-free path (scipy eigsh on the float64 product) agrees
    torch.testing.assert_close(ref.top(3), torch.linalg.eigvalsh(H).flip(0)[:3], rtol=1e-8, atol=1e-10)


def test_reference_trace_per_block_is_exact_with_the_dense_hessian(peers, monkeypatch):
    monkeypatch.setattr(peers, "backpack_diag_hessian", lambda *a: None)  # the dense path, BackPACK or not
    model, batches = tiny_problem(1)
    ref = peers.Reference(model, nn.CrossEntropyLoss(), batches, reference_probes=3)
    H = ref.dense()
    blocks = {"0": ["0.weight", "0.bias"], "rest": ["2.weight", "2.bias", "4.weight", "4.bias"]}
    value, stderr, per = ref.trace(blocks)
    assert ref.trace_method.startswith("dense")
    assert stderr == 0 and value == pytest.approx(float(H.trace()), rel=1e-12)
    first = sum(p.numel() for p in list(model.parameters())[:2])
    assert per["0"] == pytest.approx(float(H.diagonal()[:first].sum()), rel=1e-12)
    assert per["0"] + per["rest"] == pytest.approx(value, rel=1e-12)


def test_reference_hutchpp_falls_back_when_no_diagonal_is_known(peers, monkeypatch):
    model, batches = tiny_problem(2)
    ref = peers.Reference(model, nn.CrossEntropyLoss(), batches, reference_probes=ref_probes(model))
    exact = float(ref.dense().trace())
    monkeypatch.setattr(peers, "DENSE_MAX", 0)  # as for a large model without a BackPACK diagonal
    monkeypatch.setattr(peers, "backpack_diag_hessian", lambda *a: None)
    value, stderr, _ = ref.trace({})
    assert ref.trace_method.startswith("Hutch++")
    # probes >= 3 P: the sketch spans the whole space, so Hutch++ is exact up to rounding
    assert value == pytest.approx(exact, rel=1e-8)


def ref_probes(model):
    return 3 * sum(p.numel() for p in model.parameters())


@pytest.mark.optional
def test_backpack_diagonal_matches_the_dense_one(peers):
    pytest.importorskip("backpack")
    model, batches = tiny_problem(3)
    ref = peers.Reference(model, nn.CrossEntropyLoss(), batches, reference_probes=3)
    d = peers.backpack_diag_hessian(ref.model, nn.CrossEntropyLoss(), ref.batches)
    assert d is not None
    torch.testing.assert_close(d, ref.dense().diagonal(), rtol=1e-9, atol=1e-12)


@pytest.mark.optional
def test_backpack_diagonal_declines_a_transformer(peers):
    pytest.importorskip("backpack")
    torch.manual_seed(0)
    model = transformer(d_model=8, heads=2, layers=1, dim_feedforward=8).eval()
    batches = [(torch.randn(5, 40), torch.randint(0, 10, (5,)))]
    assert peers.backpack_diag_hessian(model, nn.CrossEntropyLoss(), batches) is None


def test_quick_without_peers(peers, monkeypatch, capsys):
    real = peers.peer_status
    monkeypatch.setattr(peers, "peer_status",
                        lambda path: {lib: (None if lib == "curvopt" else "not installed") for lib in real(path)})
    out = peers.main(["--quick", "--models", "mlp", "--tasks", "products,eig1,trace,density,kfac"])
    rows = out["rows"]
    ours = [r for r in rows if r["lib"] == "curvopt"]
    tasks = {r["task"] for r in ours}
    assert {"Hessian-vector", "GGN-vector", "Hessian matmat, 16 columns", "top-1 eigenvalues", peers.TRACE_TASK,
            "trace to 2% RMSE: hutchinson", "trace to 2% RMSE: hutchpp", "trace per layer", "spectral density",
            peers.KFAC_STEP, "K-FAC accuracy"} <= tasks
    for r in ours:
        assert not r.get("status"), r
    for r in ours:
        if r["task"] in ("Hessian-vector", "GGN-vector", "Hessian matmat, 16 columns"):
            assert r["error"] < 1e-5
        if r["task"] == "top-1 eigenvalues":
            assert r["error"] <= peers.EIG_TOL and r["seconds"] > 0
    for lib in ("curvlinops", "hessian_eigenthings", "pyhessian", "kfac_pytorch"):
        lib_rows = [r for r in rows if r["lib"] == lib]
        assert lib_rows and all(r["status"] == "not installed" for r in lib_rows)
    printed = capsys.readouterr().out
    assert "| top-1 eigenvalues | MLP 40-256-256-10 |" in printed and "not installed" in printed


def test_memory_child_reports_a_peak(peers, capsys, tmp_path):
    torch.manual_seed(0)
    model = peers.build_model("mlp", True)
    state = tmp_path / "state.pt"
    batches = [(torch.randn(10, 40), torch.randint(0, 10, (10,)))]
    torch.save({"model": model.state_dict(), "batches": batches}, state)
    spec = dict(threads=1, peer_path=None, device="cpu", quick=True, model="mlp", state=str(state), lib="curvopt",
                setting="defaults (tol=1e-3)")
    peers.child_memory([json.dumps(spec)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mb"] >= 0


@pytest.mark.optional
def test_quick_with_the_installed_peers(peers):
    installed = [p for p in PEERS if importlib.util.find_spec(p) is not None]
    if not installed:
        pytest.skip("no peer installed (see benchmarks/peers.py for the pip line)")
    status = peers.peer_status(None)
    out = peers.main(["--quick", "--models", "mlp,transformer", "--tasks", "products,eig1"])
    rows = out["rows"]
    for lib in installed:
        if status[lib] is not None:  # importable in name only (e.g. a missing dependency): the rows say why
            assert all(r.get("status") == status[lib] for r in rows if r["lib"] == lib)
            continue
        hv = [r for r in rows if r["lib"] == lib and r["task"] == "Hessian-vector" and r["model"] == "mlp"]
        assert hv and hv[0]["error"] < 1e-5 and not hv[0].get("status")
        eig = [r for r in rows if r["lib"] == lib and r["task"] == "top-1 eigenvalues" and r["model"] == "mlp"]
        assert eig and eig[0].get("seconds") and eig[0]["error"] <= peers.EIG_TOL
        assert eig[0].get("ratio") is not None  # ours / theirs where both are right
    if status["curvlinops"] is None:
        # curvlinops' Hessian goes through torch.func's forward-over-reverse, wrong through nn.LayerNorm
        tr = [r for r in rows if r["lib"] == "curvlinops" and r["model"] == "transformer"
              and r["task"] == "Hessian-vector"]
        assert tr and tr[0]["status"] == "WRONG" and tr[0]["error"] > 1e-3
        eig = [r for r in rows if r["lib"] == "curvlinops" and r["model"] == "transformer"
               and r["task"] == "top-1 eigenvalues"]
        assert eig and (eig[0].get("status") or "").startswith(("WRONG", "not reached")) and "ratio" not in eig[0]


def _trace_ctx(peers, status):
    torch.manual_seed(0)
    model = peers.build_model("mlp", True).eval()
    batches = [(torch.randn(20, 40), torch.randint(0, 10, (20,))) for _ in range(2)]
    args = argparse.Namespace(quick=True, rounds=1, reference_probes=3, trace_seeds=2)
    return peers.Ctx("mlp", model, batches, status, args, torch.device("cpu"))


def test_trace_estimators_on_the_shared_products_equal_their_own(peers):
    """The trace task's seeds run each estimator on one shared cached operator: the same estimate, seed for
    seed, as on the library's own operator (here curvopt's; the peers' in the optional test below)."""
    ctx = _trace_ctx(peers, {lib: None if lib == "curvopt" else "not installed" for lib in peers.LIBS})
    shared = peers._SharedProducts(ctx)
    for key, (_lib, est) in peers.trace_estimators(ctx).items():
        for seed in (0, 1):
            assert est(shared, 12, seed) == pytest.approx(est(None, 12, seed), rel=1e-5), (key, seed)


@pytest.mark.optional
def test_peer_trace_estimators_on_the_shared_products_equal_their_own(peers):
    status = peers.peer_status(None)
    if all(status[lib] is not None for lib in PEERS):
        pytest.skip("no peer installed (see benchmarks/peers.py for the pip line)")
    ctx = _trace_ctx(peers, status)
    shared = peers._SharedProducts(ctx)
    for key, (lib, est) in peers.trace_estimators(ctx).items():
        if lib != "curvopt":
            assert est(shared, 12, 3) == pytest.approx(est(None, 12, 3), rel=1e-4), key


def test_kfac_equal_work_leaves_the_layers_kfac_pytorch_lacks_to_plain_sgd(peers):
    """On the Conv1d CNN kfac-pytorch preconditions the Linear layers only: the equal-work curvopt step gives
    the Conv1d parameters exactly SGD's (momentum 0.9) update, and K-FAC's to the Linear ones."""
    torch.manual_seed(0)
    model = peers.build_model("cnn", True)
    theirs, rest = peers.kfac_pytorch_split(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert convs and {id(p) for m in convs for p in m.parameters()} <= {id(p) for p in rest}
    assert theirs and all(id(p) not in {id(q) for q in rest} for p in theirs)
    twin = peers.build_model("cnn", True)
    twin.load_state_dict(model.state_dict())
    X, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    step, _ = peers.make_kfac("curvopt", model, 0.05, equal_work=True)
    step(X, y)
    sgd = torch.optim.SGD(peers.kfac_pytorch_split(twin)[1], lr=0.05, momentum=0.9)
    nn.functional.cross_entropy(twin(X), y).backward()
    sgd.step()
    for p, q in zip(rest, peers.kfac_pytorch_split(twin)[1]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    moved = [not torch.equal(p, q) for p, q in zip(theirs, peers.kfac_pytorch_split(twin)[0])]
    assert all(moved)  # the K-FAC layers took a step (SGD on the twin left them alone)
