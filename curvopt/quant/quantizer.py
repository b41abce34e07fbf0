"""Simulated (fake) uniform weight quantization ``Q_b(W)`` at 2-8 bits, and the quantizer registry.

A :class:`Quantizer` maps a weight to the nearest point of a uniform grid, one grid per output
channel (dim 0 of the weight, all other dims flattened) or per group of ``group_size``
consecutive input elements within a channel (the GPTQ/AWQ convention). Each grid's range comes
from the channel's (group's) values and a clipping rule: ``"minmax"`` (the full range),
``"percentile"`` (a percentile of the values) or ``"mse"`` (the clip ratio of a grid of ratios
that minimises the squared quantization error, as in GPTQ's ``Quantizer.find_params``).
"""

from __future__ import annotations

from typing import Any

import torch

from curvopt.errors import OptionError, QuantizationError
from curvopt.quant.plan import check_bits
from curvopt.registry import Registry

#: Clipping rules of :class:`Quantizer`.
CLIPPINGS = ("mse", "minmax", "percentile")
#: Keyword options of :func:`make_quantizer` (those of :class:`Quantizer` but ``symmetric``, set by the name).
QUANTIZER_OPTIONS = ("group_size", "clipping", "percentile", "grid")
#: Elements per chunk of the clip-ratio search: bounds its memory whatever the weight's size.
_SEARCH_CHUNK = 2**22


class Quantizer:
    """Uniform fake quantization of a weight tensor, per output channel (dim 0) or per group.

    Symmetric (default): integer levels ``-L..L`` with ``L = 2^(b-1) - 1`` (``2^b - 1`` levels,
    zero exact) and scale ``c / L`` for a clip value ``c <= max|w|``. Asymmetric: levels
    ``0..2^b-1`` with scale ``(hi - lo) / (2^b - 1)`` and an integer zero point
    ``round(-lo / scale)``, where ``[lo, hi]`` (clipped) is the channel's ``[min, max]`` widened to
    contain 0, so that zero and a channel of constants are exact (as GPTQ and PyTorch's observers).

    A weight of ``k`` dims is read as ``[out, in]`` with ``in`` all other dims flattened (a conv
    kernel ``[out, in, kh, kw]`` as rows of ``in * kh * kw``); a 1-d weight is one channel.
    ``group_size=g`` splits each row into groups of ``g`` consecutive elements, each with its own
    scale; when ``g`` does not divide the row the last group of each row is shorter (the
    remainder), and ``g`` at least the row length is per channel. An all-zero channel (group) stays
    zero. The result has the weight's shape, dtype and device; half-precision weights are
    quantized in float32 and rounded back to their dtype (so their values lie on the grid up to
    that rounding).

    Args:
        symmetric: Symmetric (signed, zero point 0) or asymmetric (scale and zero point) grids.
        group_size: Elements per group along each row; ``None``: one grid per output channel.
        clipping: ``"mse"``: the clip ratio, among ``grid`` ratios ``k / grid`` in ``(0, 1]``,
            that minimises each channel's (group's) ``||Q(w) - w||^2`` (ties keep the larger ratio;
            ratio 1 is min-max, so the error is never above min-max's); ``"minmax"``: the full
            range (symmetric: exactly the historical ``quantize_symmetric``); ``"percentile"``:
            the ``percentile``-th percentile of ``|w|`` (asymmetric: the ``percentile``-th and
            ``100 - percentile``-th of ``w``), linearly interpolated as ``torch.quantile``.
        percentile: In ``(0, 100]``; used by ``clipping="percentile"``.
        grid: Number of clip ratios searched by ``clipping="mse"``.

    Raises:
        QuantizationError: naming the option that is out of range.

    Example::

        q = Quantizer(group_size=128)
        w4 = q.quantize(layer.weight, 4)
        q.error(layer.weight, 4)          # ||Q_4(W) - W||^2, the HAWQ-V2 perturbation
    """

    def __init__(self, *, symmetric: bool = True, group_size: int | None = None, clipping: str = "mse",
                 percentile: float = 99.9, grid: int = 100) -> None:
        if not isinstance(symmetric, bool):
            raise QuantizationError(f"Quantizer(symmetric=...) must be True or False, got {symmetric!r}")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise QuantizationError(f"Quantizer(group_size=...) must be None (per output channel) or an "
                                    f"integer >= 1, got {group_size!r}")
        if clipping not in CLIPPINGS:
            raise QuantizationError(f"Quantizer(clipping=...) must be one of {', '.join(map(repr, CLIPPINGS))}, "
                                    f"got {clipping!r}")
        if (isinstance(percentile, bool) or not isinstance(percentile, (int, float))
                or not 0 < percentile <= 100):
            raise QuantizationError(f"Quantizer(percentile=...) must be a number in (0, 100], got {percentile!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise QuantizationError(f"Quantizer(grid=...) must be an integer >= 1, got {grid!r}")
        self.symmetric = symmetric
        self.group_size = group_size
        self.clipping = clipping
        self.percentile = float(percentile)
        self.grid = grid

    @property
    def name(self) -> str:
        """The registry name of this quantizer's family (see :data:`QUANTIZER_NAMES`)."""
        return "symmetric" if self.symmetric else "asymmetric"

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-ready dict; ``make_quantizer(**d)`` rebuilds the quantizer."""
        return {"name": self.name, "group_size": self.group_size, "clipping": self.clipping,
                "percentile": self.percentile, "grid": self.grid}

    def __repr__(self) -> str:
        return (f"Quantizer(symmetric={self.symmetric}, group_size={self.group_size}, "
                f"clipping={self.clipping!r}, percentile={self.percentile}, grid={self.grid})")

    def quantize(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        """``Q_b(weight)``: same shape, dtype and device, each channel (group) on its grid.

        Raises:
            QuantizationError: for bits outside 2..8, a non-floating weight, or NaN/Inf in it.
        """
        check_bits(bits, "Quantizer.quantize(bits=...)")
        w = weight.detach()
        if not w.is_floating_point():
            raise QuantizationError(f"Quantizer.quantize: the weight must be a floating-point tensor, "
                                    f"got {w.dtype}")
        if w.numel() == 0:
            return w.clone()
        if not bool(torch.isfinite(w).all()):
            raise QuantizationError(f"Quantizer.quantize: the weight of shape {tuple(w.shape)} holds NaN or Inf "
                                    "values; a quantization grid needs finite weights")
        compute = torch.promote_types(w.dtype, torch.float32)
        flat = (w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)).to(compute)
        rows, n = flat.shape
        g = self.group_size
        if g is None or g >= n:
            q = self._quantize_rows(flat, bits)
        else:
            full = n // g * g
            parts = [self._quantize_rows(flat[:, :full].reshape(rows, full // g, g), bits).reshape(rows, full)]
            if full < n:  # the shorter last group of each row
                parts.append(self._quantize_rows(flat[:, full:], bits))
            q = torch.cat(parts, dim=1)
        return q.reshape(w.shape).to(w.dtype)

    def error(self, weight: torch.Tensor, bits: int) -> float:
        """``||Q_b(W) - W||^2`` (the HAWQ-V2 perturbation), summed in float64."""
        w = weight.detach()
        return float(((self.quantize(w, bits).double() - w.double()) ** 2).sum())

    # -- the grid of each row (last dim) of x -------------------------------------------------------

    def _quantize_rows(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """Fake-quantize each row of ``x`` (``[..., n]``) on its own grid."""
        lo, hi = self._range(x)
        if self.clipping == "mse":
            ratio = self._best_ratio(x, lo, hi, bits)
            lo, hi = lo * ratio, hi * ratio
        return self._fake(x, lo, hi, bits)

    def _range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's unclipped ``[lo, hi]`` (``[..., 1]`` each); ``lo = -hi`` when symmetric."""
        q = self.percentile / 100 if self.clipping == "percentile" else 1.0
        if self.symmetric:
            hi = _row_quantile(x.abs(), q) if q < 1 else x.abs().amax(dim=-1, keepdim=True)
            return -hi, hi
        if q < 1:
            lo, hi = _row_quantile(x, 1 - q), _row_quantile(x, q)
        else:
            lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        return lo.clamp(max=0), hi.clamp(min=0)  # zero inside the range: exact, as padding and ReLU need

    def _fake(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
        """``x`` rounded to the uniform grid of ``2^b`` levels spanning ``[lo, hi]`` (broadcast)."""
        if self.symmetric:
            levels = 2 ** (bits - 1) - 1
            scale = hi / levels
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
            return torch.clamp(torch.round(x / scale), -levels, levels) * scale
        top = 2**bits - 1
        scale = (hi - lo) / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale)
        return (torch.clamp(torch.round(x / scale) + zero, 0, top) - zero) * scale

    def _best_ratio(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
        """Per row, the ratio ``k / grid`` whose clipped grid gives the least ``||Q(x) - x||^2``.

        Ratios are tried largest first in chunks (all rows at once, memory bounded by
        :data:`_SEARCH_CHUNK`); a strictly smaller error replaces the best, so ties keep the larger.
        """
        ratios = torch.arange(self.grid, 0, -1, dtype=x.dtype, device=x.device) / self.grid
        best_err = torch.full(lo.shape, float("inf"), dtype=x.dtype, device=x.device)
        best = torch.ones_like(lo)
        step = max(1, _SEARCH_CHUNK // x.numel())
        view = (-1,) + (1,) * x.dim()
        for start in range(0, self.grid, step):
            r = ratios[start:start + step].reshape(view)  # [k, 1, ..., 1]
            err = ((self._fake(x, lo * r, hi * r, bits) - x) ** 2).sum(dim=-1, keepdim=True)  # [k, ..., 1]
            chunk_err, idx = err.min(dim=0)  # first minimum: the largest ratio among ties
            better = chunk_err < best_err
            best = torch.where(better, r.reshape(-1)[idx], best)
            best_err = torch.where(better, chunk_err, best_err)
        return best


def _row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q, dim=-1, keepdim=True)`` (linear interpolation) without its input-size
    limit (a large embedding exceeds it)."""
    s = x.sort(dim=-1).values
    pos = q * (s.shape[-1] - 1)
    i = int(pos)
    frac = pos - i
    j = min(i + 1, s.shape[-1] - 1)
    return torch.lerp(s[..., i:i + 1], s[..., j:j + 1], frac)


def make_quantizer(name: str, **options: Any) -> Quantizer:
    """The quantizer registered as ``name`` (``"symmetric"`` or ``"asymmetric"``) with ``options``
    (``group_size``, ``clipping``, ``percentile``, ``grid``): the by-name entry of configs and the CLI.

    Raises:
        OptionError: for an unknown name or option, listing the valid ones.
        QuantizationError: for an option value out of range.
    """
    factory = QUANTIZERS.get(name)
    valid = QUANTIZERS.options(name)
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise OptionError(f"make_quantizer({name!r}): unknown option {', '.join(map(repr, unknown))}; "
                          f"valid options: {', '.join(valid)}")
    return factory(**options)


#: The quantizer families by name (``[quantizer] name = ...`` in a config).
QUANTIZERS: Registry[Any] = Registry("quantizer")
QUANTIZERS.register("symmetric", lambda **options: Quantizer(symmetric=True, **options), options=QUANTIZER_OPTIONS)
QUANTIZERS.register("asymmetric", lambda **options: Quantizer(symmetric=False, **options),
                    options=QUANTIZER_OPTIONS)
#: Names accepted by :func:`make_quantizer`.
QUANTIZER_NAMES = tuple(QUANTIZERS.names())
