"""BackPACK backends (Dangel et al., 2020), optional: ``pip install 'curvopt[backpack]'``.

``backpack_kfac`` (K-FAC, Monte-Carlo), ``backpack_kflr`` (K-FAC with the exact loss
Hessian, i.e. type-2), ``backpack_diag_ggn`` (exact GGN diagonal) and
``backpack_diag_hessian`` (exact Hessian diagonal), usable wherever a registry name is
accepted. BackPACK is imported only when such a backend is built, and works on a deep
copy of the model, so the user's modules get no BackPACK hooks. Kronecker factors from
each batch are averaged with the batch-size weights of the one data loop, as the
native ``kfac`` backend does; for BackPACK weights and biases are separate blocks
(``G ⊗ A`` for a weight, ``G`` for a bias).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch

from curvopt.curvature.base import CurvatureOperator, TensorList
from curvopt.curvature.model_state import curvature_pass, seed_batch
from curvopt.curvature.registry import register_curvature
from curvopt.errors import MissingDependencyError, OptionError, UnsupportedModuleError

INSTALL = "pip install 'curvopt[backpack]'  (or: pip install backpack-for-pytorch)"


def import_backpack():
    """The ``backpack`` package, or an error with the exact install line."""
    try:
        import backpack
        import backpack.extensions  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"this curvature backend needs BackPACK, which is not installed: {INSTALL}") from e
    return backpack


class BackpackOperator(CurvatureOperator):
    """Base of the BackPACK backends: one BackPACK extension, its per-parameter result."""

    extension: ClassVar[str] = ""
    attribute: ClassVar[str] = ""
    kronecker: ClassVar[bool] = False

    def __init__(self, model, loss_fn, data, **options: Any) -> None:
        import_backpack()
        super().__init__(model, loss_fn, data, **options)
        self._results: list[list[torch.Tensor]] | None = None
        self._results_versions: Any = None

    def _extension(self, index: int):
        import backpack.extensions as extensions

        return getattr(extensions, self.extension)()

    def quantities(self) -> list[list[torch.Tensor]]:
        """Per parameter: ``[diagonal]`` or the Kronecker factors ``[G, A]`` (weights) / ``[G]`` (biases)."""
        self._follow_parameters()
        if self._results is None or not self._results_versions.matches(self._params):
            snapshot = self._versions()
            self._results = self._compute()
            self._results_versions = snapshot
        return self._results

    def _compute(self) -> list[list[torch.Tensor]]:
        from backpack import backpack, extend

        model = extend(copy.deepcopy(self.model))
        loss_fn = extend(copy.deepcopy(self.loss_fn))
        selected = set(self.param_names)
        params = dict(model.named_parameters())
        for name, p in params.items():
            p.requires_grad_(name in selected)
        mine = [params[n] for n in self.param_names]
        sizes: list[int] = []

        def product(index: int, X: Any, y: torch.Tensor):
            X, y = self._to_model(X), self._to_model(y)
            with curvature_pass(model), backpack(self._extension(index)):
                seed_batch(index, getattr(self, "seed", 0))  # one dropout mask per batch, user's RNG kept
                loss = loss_fn(model(X), y)
                loss.backward()
            parts = []
            for p in mine:
                value = getattr(p, self.attribute)
                parts += list(value) if isinstance(value, (list, tuple)) else [value]
                p.grad = None
            if not sizes:
                sizes.extend(len(getattr(p, self.attribute)) if self.kronecker else 1 for p in mine)
            return loss.detach(), [t.detach() for t in parts]

        # A diagonal is shaped like its parameter, so a rank without samples can join the pass's one
        # collective with zeros; Kronecker factors' shapes are BackPACK's to tell: those ranks agree first.
        zeros = None if self.kronecker else (lambda: [torch.zeros_like(p.detach()) for p in mine])
        try:
            flat = self._accumulate(product, self.data, zeros=zeros)
        except NotImplementedError as e:  # BackPACK has no rule for some module
            raise UnsupportedModuleError(
                f"{self.name}: BackPACK cannot compute {self.extension} here ({e}); the native backends "
                "('kfac', 'ggn', 'hessian') work with any module") from e
        out, i = [], 0
        for s in sizes:
            out.append(flat[i : i + s])
            i += s
        return out

    def _matmat_list(self, V: TensorList) -> TensorList:
        out = []
        for v, q in zip(V, self.quantities()):
            if not self.kronecker:
                out.append(q[0] * v)
            elif len(q) == 1:  # bias: G
                out.append(v.reshape(v.shape[0], -1) @ q[0].T)
            else:  # weight: G ⊗ A acting as W -> G W A
                G, A = q[0], q[1]
                M = v.reshape(v.shape[0], G.shape[0], -1)
                out.append((G @ M @ A).reshape(v.shape))
        return out


@register_curvature("backpack_diag_ggn")
class BackpackDiagGGN(BackpackOperator):
    """Diagonal of the exact GGN (BackPACK ``DiagGGNExact``)."""

    extension, attribute = "DiagGGNExact", "diag_ggn_exact"


@register_curvature("backpack_diag_hessian")
class BackpackDiagHessian(BackpackOperator):
    """Diagonal of the exact Hessian (BackPACK ``DiagHessian``)."""

    extension, attribute = "DiagHessian", "diag_h"


@register_curvature("backpack_kflr")
class BackpackKFLR(BackpackOperator):
    """K-FAC with the exact loss Hessian (BackPACK ``KFLR``), the type-2 Fisher of ``kfac``."""

    extension, attribute, kronecker = "KFLR", "kflr", True


@register_curvature("backpack_kfac")
class BackpackKFAC(BackpackOperator):
    """K-FAC with Monte-Carlo sampled labels (BackPACK ``KFAC``; ``mc_samples``, ``seed``)."""

    extension, attribute, kronecker = "KFAC", "kfac", True

    def __init__(self, model, loss_fn, data, *, mc_samples: int = 1, seed: int = 0, **options: Any) -> None:
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise OptionError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        self.mc_samples, self.seed = mc_samples, int(seed)
        super().__init__(model, loss_fn, data, **options)

    def _extension(self, index: int):
        import backpack.extensions as extensions

        return extensions.KFAC(mc_samples=self.mc_samples)
