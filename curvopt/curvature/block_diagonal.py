"""Block-diagonal restriction of any curvature backend."""

from __future__ import annotations

from typing import Any

from curvopt.curvature.base import CurvatureOperator, TensorList
from curvopt.curvature.registry import CURVATURES, register_curvature
from curvopt.errors import OptionError


@register_curvature("block_diagonal")
class BlockDiagonalOperator(CurvatureOperator):
    """Keeps the diagonal blocks of another backend and zeroes the rest.

    The product with ``k`` columns is one product of the base backend with ``k * B``
    columns (each column restricted to one of the ``B`` blocks), so it is still one
    pass over the data.

    Args:
        base: Name of the wrapped backend (default ``"hessian"``) or a built
            :class:`CurvatureOperator`, whose model, data and parameters are reused.
        blocks: The grouping, as for every operator (default: one block per module).
        **options: Passed to the base backend (``cache``, ``mc_samples``, ...).
    """

    forwards_options = True

    def __init__(
        self,
        model,
        loss_fn,
        data,
        *,
        base: str | CurvatureOperator = "hessian",
        params=None,
        blocks=None,
        **options: Any,
    ) -> None:
        if isinstance(base, CurvatureOperator):
            if options:
                raise OptionError("options cannot be passed along with a built base operator")
            self.base = base
        else:
            if base == self.name:
                raise OptionError("block_diagonal cannot wrap itself; choose another base")
            # names the base's valid options
            self.base = CURVATURES.create(base, model, loss_fn, data, params=params, **options)
        own = {k: v for k, v in options.items() if k in ("reduction", "process_group", "progress")}
        super().__init__(
            self.base.model,
            self.base.loss_fn,
            self.base.data,
            params=self.base.param_names,
            blocks=blocks if blocks is not None else _grouping(self.base),
            **own,
        )

    def _matmat_list(self, V: TensorList) -> TensorList:
        B, k = len(self.blocks), V[0].shape[0]
        owner = {i: b for b, block in enumerate(self.blocks) for i in block.indices}
        stacked = []
        for i, v in enumerate(V):
            s = v.new_zeros((B, *v.shape))
            s[owner[i]] = v
            stacked.append(s.reshape(B * k, *v.shape[1:]))
        out = self.base._matmat_list(stacked)
        return [o.reshape(B, k, *o.shape[1:])[owner[i]] for i, o in enumerate(out)]

    def clear_cache(self) -> None:
        self.base.clear_cache()


def _grouping(op: CurvatureOperator) -> dict[str, list[str]]:
    return {b.name: list(b.param_names) for b in op.blocks}


__all__ = ["BlockDiagonalOperator"]
