"""Optimizers by name, so that a config file (``[optimizer] name = "kfac"``) can choose one.

Each entry keeps the optimizer class, the keyword options it takes (its ``__init__`` less ``params`` and
``lr``) and ``default_lr``: the learning rate used when a config leaves it unset (1 = the full Newton /
trust-region / cubic step).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from curvopt.optim.arc import ARC
from curvopt.optim.kfac import KFAC
from curvopt.optim.newton_mr import NewtonMR
from curvopt.optim.second_order import SecondOrderOptimizer
from curvopt.optim.trust_region import TrustRegion
from curvopt.registry import Registry

#: Gradient optimizers (``loss.backward(); step()``) and the Newton-type ones (``step(closure)``).
OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry("optimizer", positional=True, inherit=False,
                                                             exclude=("params", "lr"))
OPTIMIZERS.register("kfac", KFAC, default_lr=0.03)
OPTIMIZERS.register("adam", torch.optim.Adam, default_lr=1e-3)
OPTIMIZERS.register("sgd", torch.optim.SGD, default_lr=0.05)
OPTIMIZERS.register("newton_mr", NewtonMR, default_lr=1.0)
OPTIMIZERS.register("trust_region", TrustRegion, default_lr=1.0)
OPTIMIZERS.register("arc", ARC, default_lr=1.0)


def available_optimizers() -> list[str]:
    """The names :func:`make_optimizer` accepts, in registration order."""
    return OPTIMIZERS.names()


def takes_closure(name: str) -> bool:
    """Whether optimizer ``name`` is Newton-type: ``step(closure)`` on a batch, its lr a step length."""
    return issubclass(OPTIMIZERS.get(name), SecondOrderOptimizer)


def make_optimizer(name: str, params: Iterable[Any], lr: float | None = None,
                   **options: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` with ``options`` as keyword arguments.

    Args:
        name: One of :func:`available_optimizers` (``"kfac"``, ``"adam"``, ``"sgd"``, ``"newton_mr"``,
            ``"trust_region"``, ``"arc"``).
        params: Parameters or parameter groups.
        lr: Learning rate (step length); ``None`` or 0: the entry's ``default_lr``.
        **options: The class's other keyword arguments.

    Raises:
        OptionError: an unknown name or option, listing the valid ones.
    """
    OPTIMIZERS.check_options(name, options)
    return OPTIMIZERS.get(name)(params, lr=lr or OPTIMIZERS.info(name, "default_lr"), **options)


__all__ = ["OPTIMIZERS", "available_optimizers", "make_optimizer", "takes_closure"]
