"""K-FAC operator: factors against dense computations, exactness where K-FAC is exact."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.func import grad, vmap

import curvopt
from curvopt.errors import OptionError
from curvopt_tests.problems import problems


def _split(X, y, cuts):
    return list(zip(X.split(cuts), y.split(cuts)))


def _classifier(d_in, hidden, classes, n):
    """A seeded tanh MLP in float64 with ``n`` random samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()
    return model, torch.randn(n, d_in, dtype=torch.float64), torch.randint(0, classes, (n,))


@given(n=st.integers(1, 7), d_in=st.integers(1, 4), d_out=st.integers(1, 3), bias=st.booleans(),
       reduction=st.sampled_from(["mean", "sum"]), seed=st.integers(0, 1000), first=st.integers(1, 7))
def test_type2_equals_ggn_for_one_linear_layer_with_mse(n, d_in, d_out, bias, reduction, seed, first):
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out, bias=bias).double()
    X, y = torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64)
    data = _split(X, y, [min(first, n), n - min(first, n)] if first < n else [n])
    loss = nn.MSELoss(reduction=reduction)
    K = curvopt.curvature("kfac", model, loss, data).to_dense()
    G = curvopt.curvature("ggn", model, loss, (X, y)).to_dense()
    torch.testing.assert_close(K, G, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss()])
def test_type2_equals_ggn_for_one_linear_layer_and_one_sample(loss):
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    X = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([2]) if isinstance(loss, nn.CrossEntropyLoss) else torch.rand(1, 4, dtype=torch.float64)
    K = curvopt.curvature("kfac", model, loss, (X, y)).to_dense()
    torch.testing.assert_close(K, curvopt.curvature("ggn", model, loss, (X, y)).to_dense())


def test_type2_equals_ggn_for_conv_with_one_position():
    """A kernel that covers the whole input has one position: expand = reduce = exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, kernel_size=5), nn.Flatten()).double()
    X, y = torch.randn(6, 2, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    G = curvopt.curvature("ggn", model, nn.MSELoss(), (X, y)).to_dense()
    for approx in ("expand", "reduce"):
        K = curvopt.curvature("kfac", model, nn.MSELoss(), (X, y), kfac_approx=approx).to_dense()
        torch.testing.assert_close(K, G)


@given(pb=problems(kinds=("mlp",), losses=("mse",)))
def test_last_layer_block_equals_ggn_block_with_mse(pb):
    K = curvopt.curvature("kfac", pb.model, pb.loss_fn, pb.data).to_dense()
    G = curvopt.curvature("ggn", pb.model, pb.loss_fn, pb.data).to_dense()
    last = pb.model[-1].weight.numel() + pb.model[-1].bias.numel()
    torch.testing.assert_close(K[-last:, -last:], G[-last:, -last:], rtol=1e-9, atol=1e-11)


@given(pb=problems(kinds=("mlp", "cnn1d", "cnn2d")))
def test_symmetric_positive_semidefinite_and_block_diagonal(pb):
    op = curvopt.curvature("kfac", pb.model, pb.loss_fn, pb.data)
    K = op.to_dense()
    torch.testing.assert_close(K, K.T)
    eig = torch.linalg.eigvalsh(K)
    assert eig.min() >= -1e-10 * max(1.0, eig.abs().max().item())
    from curvopt_tests.problems import block_mask

    assert (K[~block_mask(op)] == 0).all()


def test_empirical_factors_against_dense_per_sample_gradients():
    """A = mean of [a, 1][a, 1]^T; G = (1/N) sum of per-sample d loss / d layer output, outer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 3, (9,))
    op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), _split(X, y, [5, 4]), fisher_type="empirical")
    first, second = op.factors()
    a0 = torch.cat([X, torch.ones(9, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(first.A, a0.T @ a0 / 9)
    s0 = model[0](X).detach()

    def loss_from_s0(s, target):  # the rest of the network after layer 0, one sample
        return nn.functional.cross_entropy(model[2](torch.tanh(s)).unsqueeze(0), target.unsqueeze(0))

    g0 = vmap(grad(loss_from_s0))(s0, y)
    torch.testing.assert_close(first.G, g0.T @ g0 / 9)
    h = torch.tanh(s0)
    a1 = torch.cat([h, torch.ones(9, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(second.A, a1.T @ a1 / 9)
    g1 = torch.softmax(model[2](h), 1) - nn.functional.one_hot(y, 3)
    torch.testing.assert_close(second.G, g1.T @ g1 / 9)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv_input_factor_against_explicit_patches(approx):
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=1).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 4, 2)).double()
    X, y = torch.randn(5, 2, 8, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    op = curvopt.curvature("kfac", model, nn.MSELoss(), (X, y), kfac_approx=approx)
    padded = nn.functional.pad(X, (1, 1))
    patches = torch.stack([padded[:, :, 2 * t:2 * t + 3].reshape(5, -1) for t in range(4)], 1)  # [N, T, 6]
    patches = torch.cat([patches, torch.ones(5, 4, 1, dtype=torch.float64)], 2)
    if approx == "reduce":
        patches = patches.mean(1, keepdim=True)
    flat = patches.reshape(-1, 7)
    torch.testing.assert_close(op.factors()[0].A, flat.T @ flat / flat.shape[0])


@given(dims=st.sampled_from([1, 2]), c=st.integers(1, 3), size=st.integers(3, 9), kernel=st.integers(1, 3),
       stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 2), seed=st.integers(0, 99))
def test_conv_patches_equal_im2col(dims, c, size, kernel, stride, padding, dilation, seed):
    """layer_inputs' strided-view patches equal F.unfold's, for Conv1d and Conv2d (non-square in 2-d)."""
    from curvopt.curvature.kfac import layer_inputs

    assume(dilation * (kernel - 1) + 1 <= size + 2 * padding)  # at least one output position
    torch.manual_seed(seed)
    if dims == 1:
        conv = nn.Conv1d(c, 2, kernel, stride=stride, padding=padding, dilation=dilation)
        x = torch.randn(2, c, size, dtype=torch.float64)
        expected = nn.functional.unfold(x.unsqueeze(2), (1, kernel), dilation=(1, dilation), padding=(0, padding),
                                        stride=(1, stride))
    else:
        conv = nn.Conv2d(c, 2, (kernel, 1 + kernel % 2), stride=(stride, 1), padding=(padding, 1),
                         dilation=(dilation, 1))
        x = torch.randn(2, c, size, size + 1, dtype=torch.float64)
        expected = nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                                        stride=conv.stride)
    patches = layer_inputs(conv, x)
    torch.testing.assert_close(patches, expected.transpose(1, 2), rtol=0, atol=0)
    assert patches.shape[1] == conv(x.float()).shape[2:].numel()


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel", [2, 3])
def test_conv_patches_with_string_padding(padding, kernel):
    """padding="same" pads dilation * (kernel - 1) zeros, the odd one on the right (as PyTorch)."""
    from curvopt.curvature.kfac import layer_inputs

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (kernel, 3), padding=padding, dilation=(2, 1)).double()
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    th, tw = (2 * (kernel - 1), 2) if padding == "same" else (0, 0)
    padded = nn.functional.pad(x, [tw // 2, tw - tw // 2, th // 2, th - th // 2])
    expected = nn.functional.unfold(padded, conv.kernel_size, dilation=conv.dilation).transpose(1, 2)
    torch.testing.assert_close(layer_inputs(conv, x), expected, rtol=0, atol=0)
    # the patches reproduce the convolution itself
    out = layer_inputs(conv, x) @ conv.weight.reshape(3, -1).T + conv.bias
    torch.testing.assert_close(out.transpose(1, 2).reshape(conv(x).shape), conv(x))


def test_grouped_and_circular_convolutions_get_diagonal_blocks():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.Conv1d(4, 2, 3, padding=1, padding_mode="circular"),
                          nn.Flatten(), nn.Linear(2 * 4, 3)).double()
    X, y = torch.randn(5, 2, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.warns(UserWarning, match=r"0\.weight.*1\.bias.*groups=1 and zero padding"):
        op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y))
    assert [block.module_name for block in op.layers] == ["3"]
    dense = op.to_dense()
    torch.testing.assert_close(dense, dense.T)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_input_factor_with_bias_equals_the_factor_of_inputs_with_a_one_appended(approx):
    from curvopt.curvature.kfac import input_factor

    torch.manual_seed(0)
    a = torch.randn(5, 3, 4, dtype=torch.float64)
    ones = torch.cat([a, torch.ones(5, 3, 1, dtype=torch.float64)], 2)
    expected = input_factor(ones, approx)
    torch.testing.assert_close(input_factor(a, approx, bias=True), expected)
    acc = input_factor(a[:2], approx, bias=True, alpha=2.0)  # two batches accumulated in place
    same = input_factor(a[2:], approx, bias=True, alpha=3.0, out=acc)
    assert same is acc
    torch.testing.assert_close(acc / 5, expected)


def test_mc_converges_to_type2():
    model, X, y = _classifier(2, 3, 3, 6)
    exact = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y)).to_dense()

    def err(samples):
        mc = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y), fisher_type="mc",
                               mc_samples=samples, seed=3).to_dense()
        return float(torch.linalg.norm(mc - exact) / torch.linalg.norm(exact))

    few, many = err(4), err(20_000)
    assert many < 0.03 and many < few / 8


def test_damped_inverse_inverts_and_factored_damping_matches_its_formula():
    model, X, y = _classifier(3, 4, 2, 8)
    op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y))
    K = op.to_dense()
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)
    lam = 0.1
    damped = K + lam * torch.eye(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(damped @ op.inverse_matmat(V, lam), V)
    torch.testing.assert_close(op.inverse_matmat(V[:, 0], lam), op.inverse_matmat(V, lam)[:, 0])
    # factored damping: per layer (A + pi sqrt(lam) I)^-1 ⊗ (G + sqrt(lam)/pi I)^-1 in [W, b] layout
    out = op.inverse_matmat(V[:, :1], lam, factored=True)
    layer = op.factors()[0]
    A, G = layer.A, layer.G
    pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
    Ad = A + pi * lam**0.5 * torch.eye(A.shape[0], dtype=A.dtype)
    Gd = G + lam**0.5 / pi * torch.eye(G.shape[0], dtype=G.dtype)
    Wb = torch.cat([V[:12, 0].reshape(4, 3), V[12:16, 0].reshape(4, 1)], 1)
    expected = torch.linalg.solve(Gd, Wb) @ torch.linalg.inv(Ad)
    torch.testing.assert_close(out[:12, 0].reshape(4, 3), expected[:, :3])
    torch.testing.assert_close(out[12:16, 0], expected[:, 3])


def test_factors_follow_parameter_changes():
    model, X, y = _classifier(2, 3, 2, 5)
    op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y))
    before = op.to_dense()
    with torch.no_grad():
        model[0].weight.mul_(3)
    fresh = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y)).to_dense()
    assert not torch.allclose(before, fresh)
    torch.testing.assert_close(op.to_dense(), fresh)


@pytest.mark.parametrize("fisher_type", ["type2", "empirical"])
def test_other_layers_get_the_exact_diagonal_with_one_warning(fisher_type):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 3, (7,))
    data = _split(X, y, [4, 3])
    with pytest.warns(UserWarning, match=r"no Kronecker structure for 1.weight, 1.bias; they get a") as rec:
        op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), data, fisher_type=fisher_type)
    assert len(rec) == 1
    K = op.to_dense()
    ref = curvopt.curvature("ggn" if fisher_type == "type2" else "empirical_fisher", model,
                            nn.CrossEntropyLoss(), data).to_dense()
    ln = slice(16, 24)  # 0.weight (12), 0.bias (4), then 1.weight, 1.bias
    torch.testing.assert_close(K[ln, ln], torch.diag(ref.diagonal()[ln]))
    assert (K[ln, :16] == 0).all() and (K[ln, 24:] == 0).all()
    V = torch.randn(op.shape[0], 2, dtype=torch.float64)
    damped = K + 0.1 * torch.eye(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(damped @ op.inverse_matmat(V, 0.1), V)


def test_kfac_errors():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    data = (torch.randn(4, 2), torch.randint(0, 2, (4,)))
    op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), data,
                           params=[n for n, _ in model.named_parameters() if not n.startswith("1.")])
    assert op.shape[0] == 9 + 8
    with pytest.raises(OptionError, match="valid: type2, mc, empirical"):
        curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), data, fisher_type="exact")
    with pytest.raises(OptionError, match="valid: expand, reduce"):
        curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), data, kfac_approx="sum")
    with pytest.raises(OptionError, match="damping must be positive"):
        op.inverse_matmat(torch.zeros(op.shape[0]), 0.0)


def test_cholesky_inverses_match_the_eigen_formula_and_fall_back_when_indefinite():
    from curvopt.curvature.kfac import factored_inverses, factored_inverses_cholesky

    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 4, generator=g, dtype=torch.float64)
    A, G = X.T @ X / 6, torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    eig = lambda M: torch.linalg.eigh(M)  # noqa: E731
    for got, want in zip(factored_inverses_cholesky(A, G, 1e-2), factored_inverses(eig(A), eig(G), 1e-2)):
        torch.testing.assert_close(got, want)
    # a factor with a (round-off sized) negative eigenvalue: Cholesky fails, eigenvalues are clamped at 0
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    lam = torch.tensor([-1e-3, 0.5, 1.0, 2.0], dtype=torch.float64)
    bad = Q @ torch.diag(lam) @ Q.T
    inv_A, _ = factored_inverses_cholesky(bad, torch.eye(3, dtype=torch.float64), 1e-8)
    assert torch.isfinite(inv_A).all()
    pi = (lam.mean() / 1.0).sqrt()
    torch.testing.assert_close(inv_A, Q @ torch.diag(1 / (lam.clamp_min(0) + pi * 1e-4)) @ Q.T)
