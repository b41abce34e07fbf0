"""Random small problems (model, loss, data split) drawn by hypothesis, and dense
float64 reference matrices built independently with ``torch.func``."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian, jacrev

ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "elu": nn.ELU}
LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


@dataclass
class Problem:
    model: nn.Module
    loss_fn: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    splits: list[int]
    description: str

    @property
    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.X.split(self.splits), self.y.split(self.splits)))

    @property
    def data(self):
        """A single batch when there is one split, else a list of batches."""
        return (self.X, self.y) if len(self.splits) == 1 else self.batches

    def __repr__(self) -> str:  # shown by hypothesis on failure
        return f"Problem({self.description}, splits={self.splits})"


def build_model(kind: str, width: int, depth: int, act: str, out: int, in_shape, seed: int):
    torch.manual_seed(seed)
    A = ACTIVATIONS[act]
    layers: list[nn.Module] = []
    if kind == "mlp":
        d = in_shape[0]
        for _ in range(depth):
            layers += [nn.Linear(d, width), A()]
            d = width
        layers.append(nn.Linear(d, out))
    elif kind == "cnn1d":
        c, L = in_shape
        layers += [nn.Conv1d(c, width, kernel_size=2, stride=1 + depth % 2), A(), nn.Flatten()]
        n = width * ((L - 2) // (1 + depth % 2) + 1)
        layers.append(nn.Linear(n, out))
    else:  # cnn2d
        c, H, W = in_shape
        layers += [nn.Conv2d(c, width, kernel_size=2), A(), nn.Flatten()]
        layers.append(nn.Linear(width * (H - 1) * (W - 1), out))
    return nn.Sequential(*layers).double()


@st.composite
def problems(draw, losses=tuple(LOSSES), kinds=("mlp", "cnn1d", "cnn2d"), reductions=("mean", "sum")):
    kind = draw(st.sampled_from(kinds))
    loss_name = draw(st.sampled_from(losses))
    reduction = draw(st.sampled_from(reductions))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    width = draw(st.integers(1, 3))
    depth = draw(st.integers(1, 2))
    out = draw(st.integers(2, 3))
    n = draw(st.integers(1, 6))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=3))) if n > 1 else []
    splits = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    seed = draw(st.integers(0, 2**16))
    in_shape = {"mlp": (draw(st.integers(1, 3)),), "cnn1d": (draw(st.integers(1, 2)), 4),
                "cnn2d": (1, 3, 3)}[kind]
    model = build_model(kind, width, depth, act, out, in_shape, seed)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, *in_shape, generator=g, dtype=torch.float64)
    if loss_name == "ce":
        y = torch.randint(0, out, (n,), generator=g)
    elif loss_name == "mse":
        y = torch.randn(n, out, generator=g, dtype=torch.float64)
    else:
        y = torch.rand(n, out, generator=g, dtype=torch.float64)
    loss_fn = LOSSES[loss_name](reduction=reduction)
    desc = f"{kind} width={width} depth={depth} act={act} out={out} loss={loss_name}/{reduction} seed={seed}"
    return Problem(model, loss_fn, X, y, splits, desc)


# ---------------------------------------------------------------- dense references
def _flat_params(model: nn.Module):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def unflat(t):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            out[n] = t[i : i + k].reshape(s)
            i += k
        return out

    return theta, unflat


def reference_hessian(model: nn.Module, loss_fn, X, y) -> torch.Tensor:
    """Reverse-over-reverse dense Hessian of ``loss_fn(model(X), y)`` in the flat order of
    ``model.named_parameters()`` (``torch.autograd.functional.hessian``: right through LayerNorm, where
    ``torch.func.hessian``'s forward-over-reverse is not in torch 2.13)."""
    theta, unflat = _flat_params(model)

    def risk(t):
        return loss_fn(functional_call(model, unflat(t), (X,)), y)

    return torch.autograd.functional.hessian(risk, theta)


def dense_hessian(pb: Problem) -> torch.Tensor:
    theta, unflat = _flat_params(pb.model)

    def risk(t):
        return pb.loss_fn(functional_call(pb.model, unflat(t), (pb.X,)), pb.y)

    return hessian(risk)(theta)


def _jacobian_and_output(pb: Problem):
    theta, unflat = _flat_params(pb.model)

    def net(t):
        return functional_call(pb.model, unflat(t), (pb.X,))

    out = net(theta)
    J = jacrev(net)(theta).reshape(out.numel(), -1)
    return J, out.detach()


def dense_ggn(pb: Problem) -> torch.Tensor:
    J, out = _jacobian_and_output(pb)
    H = hessian(lambda o: pb.loss_fn(o, pb.y))(out).reshape(out.numel(), out.numel())
    return J.T @ H @ J


def dense_empirical_fisher(pb: Problem) -> torch.Tensor:
    theta, unflat = _flat_params(pb.model)
    summed = type(pb.loss_fn)(reduction="sum")

    def per_sample(t):
        out = functional_call(pb.model, unflat(t), (pb.X,))
        return torch.stack([summed(out[i : i + 1], pb.y[i : i + 1]) for i in range(pb.X.shape[0])])

    G = jacrev(per_sample)(theta)  # [N, P]
    out = pb.model(pb.X).detach()
    # the factor between the problem's reduction and a plain sum, measured, not assumed
    c = float(pb.loss_fn(out, pb.y) / summed(out, pb.y))
    return c * G.T @ G


def block_mask(op) -> torch.Tensor:
    P = op.shape[0]
    sizes = [p.numel() for p in op.params]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    mask = torch.zeros(P, P, dtype=torch.bool)
    for block in op.blocks:
        idx = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in block.indices])
        mask[idx.unsqueeze(1), idx.unsqueeze(0)] = True
    return mask


def model_state(model):
    """What looking at a model must leave as found: parameters and buffers, train/eval flags, the global RNG."""
    return (copy.deepcopy(model.state_dict()), {n: m.training for n, m in model.named_modules()},
            torch.get_rng_state())


def assert_same_state(model, before):
    """``model`` is as :func:`model_state` recorded it in ``before``."""
    params, modes, rng = before
    after = model.state_dict()
    assert all(torch.equal(params[k], after[k]) for k in params), "parameters or buffers changed"
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng), "the global random state advanced"
