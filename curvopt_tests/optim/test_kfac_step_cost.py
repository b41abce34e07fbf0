"""curvopt.KFAC's hot path: host reads per step, and module hooks only while a factor update is due."""

import copy

import pytest
import torch
from torch import nn

import curvopt
from curvopt.models import digits_cnn, mlp
from curvopt_tests.host_reads import CountHostReads
from curvopt_tests.optim.test_kfac_optimizer import _train

#: Tensor methods that copy device data to the host (a synchronisation on an accelerator).
HOST_READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__complex__"}


def _HostReads() -> CountHostReads:
    return CountHostReads(HOST_READS)


def _batches(n_batches, n=16, d_in=64, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g))
            for _ in range(n_batches)]


@pytest.mark.parametrize("kl_clip, expected", [(1e-3, [3, 1, 3, 1, 3, 1, 2, 1]), (0.0, [2, 1, 2, 1, 2, 1, 1, 1])])
def test_host_reads_per_step(kl_clip, expected):
    """One read per step (finiteness and KL clip together), one more at a factor update (the new statistics
    are checked before they enter the factors), one more at an inverse update (all Cholesky flags at once):
    before, a step read twice and an inverse update twice more per layer."""
    torch.manual_seed(0)
    model = digits_cnn(channels=2, hidden=8)  # four Conv2d and two Linear layers
    opt = curvopt.KFAC(model.parameters(), factor_every=2, inverse_every=4, kl_clip=kl_clip)
    counts = []
    for X, y in _batches(8):
        with _HostReads() as reads:  # the whole iteration: the hooks in forward and backward read nothing
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
        counts.append(reads.count)
    # steps 0, 2, 4: factors and inverses (warm-up until step 4, then every 4); step 6: factors only.
    # Without the KL clip, a factor update's finiteness check is the read that a step without one needs
    assert counts == expected


def test_hooks_only_while_a_factor_update_is_due_and_factors_still_exact():
    """Between factor updates the module hooks are removed (plain forward passes); they come back for the
    next factor update, whose statistics are those of its own batch."""
    torch.manual_seed(0)
    model = mlp((40, 8, 10))
    decay = 0.9
    opt = curvopt.KFAC(model.parameters(), factor_every=3, factor_decay=decay)
    batches = _batches(4, d_in=40)
    installed = []
    for X, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        installed.append(bool(opt._hooks))
    assert installed == [False, False, True, False]  # the next step updates factors only after step 2
    a0, a3 = (torch.cat([X, torch.ones(len(X), 1)], 1) for X in (batches[0][0], batches[3][0]))
    expected = decay * (a0.T @ a0 / len(a0)) + (1 - decay) * (a3.T @ a3 / len(a3))
    torch.testing.assert_close(opt.state[model[0].weight]["A"], expected)


def test_a_parameter_group_added_between_factor_updates_gets_its_factors_at_its_first_step():
    torch.manual_seed(0)
    model = mlp((40, 8, 10))
    opt = curvopt.KFAC(model[0].parameters(), factor_every=5)
    batches = _batches(2, d_in=40)
    X, y = batches[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    assert not opt._hooks  # model[0]'s next factor update is at step 5
    opt.add_param_group({"params": model[2].parameters()})
    X, y = batches[1]
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    with torch.no_grad():
        h = torch.relu(model[0](X))  # model[2]'s inputs, before the step moves model[0]
    opt.step()
    a = torch.cat([h, torch.ones(len(h), 1)], 1)
    assert opt.state[model[2].weight]["step"] == 1
    torch.testing.assert_close(opt.state[model[2].weight]["A"], a.T @ a / len(a), rtol=1e-4, atol=1e-6)


def test_closed_optimizer_never_reinstalls_its_hooks():
    torch.manual_seed(0)
    model = mlp((40, 8, 10))
    opt = curvopt.KFAC(model.parameters(), factor_every=2)
    X, y = _batches(1, d_in=40)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    opt.close()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        assert not opt._hooks and not opt._pending


def test_resumed_between_factor_updates_preconditions_like_the_original():
    """A loaded state dict's layers were unknown until their next factor update, so in between their
    weights got the diagonal fallback (silently wrong steps); the layers are now found at the next
    forward pass."""
    torch.manual_seed(0)
    model = mlp((40, 8, 10))
    opt = curvopt.KFAC(model.parameters(), factor_every=4, inverse_every=8)
    batches = _batches(5, d_in=40)
    _train(model, opt, batches[:2])
    resumed = mlp((40, 8, 10))
    resumed.load_state_dict(model.state_dict())
    ropt = curvopt.KFAC(resumed.parameters(), factor_every=4, inverse_every=8)
    ropt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, batches[2:])  # steps 2, 3 without a factor update, then step 4 with one
    _train(resumed, ropt, batches[2:])
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert "diag" not in ropt.state[resumed[0].weight]


def test_each_step_applies_the_inverses_stored_for_it_across_refreshes_and_a_loaded_state():
    """The step applies the bias layer's ``inv_A`` through blocks taken once per inverse (cached by the
    inverse's identity): at every step, also the first after an inverse refresh and after a state dict
    replaced the inverses, the update is ``G_inv [gw | gb] A_inv`` of the inverses stored in the state."""
    torch.manual_seed(0)
    model = mlp((40, 8, 10)).double()
    kw = dict(lr=1.0, momentum=0.0, kl_clip=0.0, factor_every=1, inverse_every=2)
    opt = curvopt.KFAC(model.parameters(), **kw)
    other_model = copy.deepcopy(model)
    other = curvopt.KFAC(other_model.parameters(), **kw)
    _train(other_model, other, [(X.double(), y) for X, y in _batches(3, d_in=40, seed=1)])
    checked = 0
    for i, (X, y) in enumerate(_batches(8, d_in=40)):
        if i == 5:  # step 5 does not refresh: it must use the loaded inverses, not the blocks of the old ones
            opt.load_state_dict(copy.deepcopy(other.state_dict()))
        opt.zero_grad()
        nn.functional.cross_entropy(model(X.double()), y).backward()
        before = [(m.weight.detach().clone(), m.bias.detach().clone(), m.weight.grad.clone(), m.bias.grad.clone())
                  for m in model if isinstance(m, nn.Linear)]
        opt.step()
        for m, (w0, b0, gw, gb) in zip([m for m in model if isinstance(m, nn.Linear)], before):
            state = opt.state[m.weight]
            if "inv_A" not in state:
                continue
            u = state["inv_G"] @ torch.cat([gw, gb[:, None]], 1) @ state["inv_A"]
            torch.testing.assert_close(w0 - m.weight.detach(), u[:, :-1], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(b0 - m.bias.detach(), u[:, -1], rtol=1e-10, atol=1e-12)
            checked += 1
    assert checked >= 12
