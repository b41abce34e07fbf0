"""The one registry helper: lookup errors list the valid names, options are read from the factory's signature,
and every family (curvatures, optimizers, schedules, quantizers) is chosen by name through it."""

import pytest
import torch
from torch import nn

from curvopt.errors import OptionError, UnknownCurvatureError
from curvopt.registry import Registry, accepted_keywords


class _Base:
    def __init__(self, model, *, reduction="mean", progress=False):
        pass


class _Backend(_Base):
    def __init__(self, model, *, cache=False, mc_samples=1, **options):
        super().__init__(model, **options)


def _sgd_like(params, lr=0.1, momentum=0.0, *, nesterov=False):
    return params


def test_accepted_keywords_follow_the_signature():
    # keyword-only, up the MRO: a backend forwards **options to its base
    assert accepted_keywords(_Backend) == ["cache", "mc_samples", "reduction", "progress"]
    assert accepted_keywords(_Backend, inherit=False) == ["cache", "mc_samples"]
    # torch.optim style: positional-or-keyword too, less what the caller sets
    assert accepted_keywords(_sgd_like, positional=True, exclude=("params", "lr")) == ["momentum", "nesterov"]


def test_lookup_and_option_errors_list_the_valid_choices():
    reg = Registry("widget")
    reg.register("b", _sgd_like, default_lr=0.5)

    @reg.register("a")
    class A(_Backend):
        pass

    assert reg.names() == ["b", "a"] and Registry("w", sort=True).names() == []
    assert "a" in reg and "c" not in reg and 3 not in reg and len(reg) == 2
    assert reg.get("a") is A and reg.info("b", "default_lr") == 0.5 and reg.info("a", "default_lr") is None
    with pytest.raises(OptionError, match="unknown widget 'c'; valid names: b, a"):
        reg.get("c")
    with pytest.raises(OptionError, match=r"the 'a' widget got unknown option\(s\) 'cahce', 'z'; valid options: "
                                          r"cache, mc_samples, progress, reduction"):
        reg.check_options("a", {"cahce": 1, "z": 2, "cache": True})
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", _Base)
    reg.register("a", A)  # the same factory again: a no-op
    assert reg.create("b", [1]) == [1]


def test_the_lookup_error_type_is_the_registrys():
    reg = Registry("curvature", error=UnknownCurvatureError, sort=True)
    reg.register("z", _Backend)
    reg.register("y", _Backend)
    with pytest.raises(UnknownCurvatureError, match="unknown curvature 'x'; valid names: y, z"):
        reg.entry("x")


def test_every_family_is_chosen_through_a_registry():
    from curvopt.curvature.registry import CURVATURES, available_curvatures, curvature_class
    from curvopt.optim import KFAC, NewtonMR
    from curvopt.optim.registry import OPTIMIZERS, make_optimizer, takes_closure
    from curvopt.quant.quantizer import QUANTIZER_NAMES, QUANTIZERS
    from curvopt.schedule.registry import SCHEDULES, available_schedules

    assert available_curvatures() == CURVATURES.names() and curvature_class("ggn") is CURVATURES.get("ggn")
    assert {"hessian", "ggn", "fisher", "empirical_fisher", "kfac", "block_diagonal"} <= set(CURVATURES)
    assert OPTIMIZERS.names() == ["kfac", "adam", "sgd", "newton_mr", "trust_region", "arc"]
    assert {n: OPTIMIZERS.info(n, "default_lr") for n in OPTIMIZERS} == {
        "kfac": 0.03, "adam": 1e-3, "sgd": 0.05, "newton_mr": 1.0, "trust_region": 1.0, "arc": 1.0}
    assert [n for n in OPTIMIZERS if takes_closure(n)] == ["newton_mr", "trust_region", "arc"]
    assert "damping" in OPTIMIZERS.options("kfac") and "lr" not in OPTIMIZERS.options("kfac")
    model = nn.Linear(2, 2)
    opt = make_optimizer("sgd", model.parameters(), momentum=0.5)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.5
    assert isinstance(make_optimizer("newton_mr", model.parameters(), lr=0.5), NewtonMR)
    kfac = make_optimizer("kfac", model.parameters())
    assert isinstance(kfac, KFAC) and kfac.defaults["lr"] == 0.03
    kfac.close()
    with pytest.raises(OptionError, match="'adam' optimizer got unknown option.*'momentum'"):
        make_optimizer("adam", model.parameters(), momentum=0.9)
    with pytest.raises(OptionError, match="unknown optimizer 'lbfgs'; valid names: kfac, adam, sgd"):
        make_optimizer("lbfgs", model.parameters())
    assert available_schedules() == tuple(SCHEDULES.names()) == ("none", "fb", "gg", "abs", "absa")
    assert "eps" in SCHEDULES.options("absa") and "eps" not in SCHEDULES.options("abs")
    assert QUANTIZER_NAMES == tuple(QUANTIZERS.names())


def test_make_schedule_rejects_an_unknown_option_naming_the_valid_ones():
    # before: the schedule class's own TypeError from deep inside its __init__ ("unexpected keyword argument")
    from curvopt.schedule import make_schedule

    model = nn.Linear(3, 2)
    args = (torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(),
            (torch.randn(64, 3), torch.randint(0, 2, (64,))))
    with pytest.raises(OptionError, match=r"the 'gg' schedule got unknown option\(s\) 'kapa'; valid options: "
                                          r".*milestones"):
        make_schedule("gg", *args, batch_size=4, max_batch_size=16, milestones=[1], kapa=3)
