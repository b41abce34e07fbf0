"""K-FAC's storage and inversion: statistics, factor blocks and their matrix powers.

Shared by the kfac curvature operator (:mod:`curvopt.curvature.kfac`) and the KFAC optimizer
(:mod:`curvopt.optim.kfac`), as kfac-jax's curvature blocks: a :class:`KroneckerFactors` block holds a
layer's ``A`` and ``G`` (Martens & Grosse, 2015), updates its estimate and multiplies by a power of
``A ⊗ G`` (``-1`` with damping for an optimizer's update, ``1`` for products); a :class:`DiagonalBlock`
does the same for parameters without a Kronecker structure. :class:`StepStatistics` collects one
optimizer step's sums of ``a a^T`` and ``g g^T`` and reduces them across ranks in one collective.

Conventions: ``A`` is the mean of ``a a^T`` over the rows (samples, times positions for ``expand``), with
the bias's constant 1 appended; ``G`` is the Fisher's output factor, ``N`` times the sum of ``g g^T`` for
gradients ``g`` of a mean loss over ``N`` samples.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch

from curvopt import distributed


# ---------------------------------------------------------------------------- statistics
def input_factor(a: torch.Tensor, approx: str, *, bias: bool = False, alpha: float = 1.0,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``A``: mean of ``a a^T`` over samples (and positions for ``expand``), ``a`` ``[N, T, d]``,
    with a constant 1 appended to ``a`` for a ``bias``; times ``alpha``, and added to ``out``
    in place when it is given. The bias row and column are the input sums, so the inputs are
    never copied to append the 1. Half-precision inputs are summed in float32."""
    a = _statistics_dtype(a)
    if approx == "reduce":
        a = a.mean(1, keepdim=True)
    a = a.reshape(-1, a.shape[-1])
    weight = alpha / a.shape[0]
    if not bias:
        return _gram(a, weight, out)
    d = a.shape[1]
    if out is None:
        out = a.new_zeros(d + 1, d + 1)
    _gram(a, weight, out[:d, :d])
    sums = a.sum(0)
    out[:d, d].add_(sums, alpha=weight)
    out[d, :d].add_(sums, alpha=weight)
    out[d, d].add_(alpha)
    return out


def output_factor(g: torch.Tensor, approx: str, *, alpha: float = 1.0,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum g g^T`` over vectors, samples and positions (positions summed first for
    ``reduce``), for ``g`` of shape ``[K, N, T, out]``; times ``alpha``, and added to ``out``
    in place when it is given."""
    g = _statistics_dtype(g)
    if approx == "reduce":
        g = g.sum(2, keepdim=True)
    g = g.reshape(-1, g.shape[-1])
    return _gram(g, alpha, out)


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype curvature statistics of tensors of ``dtype`` are accumulated and kept in:
    float32 for half precision, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _statistics_dtype(x: torch.Tensor) -> torch.Tensor:
    """Half-precision activations and gradients (autocast) in float32: their second-moment
    sums overflow float16 (65504) at ordinary magnitudes, and a GradScaler's scale squares."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _gram(x: torch.Tensor, alpha: float, out: torch.Tensor | None) -> torch.Tensor:
    """``alpha x^T x`` (plus ``out``, in place). Scaling in place and accumulating with
    ``addmm_`` allocate no factor-sized temporaries, which on CPU cost page faults each."""
    if out is not None:
        return out.addmm_(x.T, x, alpha=alpha)
    gram = x.T @ x
    return gram if alpha == 1.0 else gram.mul_(alpha)


class LayerStatistics:
    """One Kronecker layer's sums since the optimizer's last step: ``A`` (rows weighted so that the
    forward passes' samples count alike) over ``a_count`` samples, and ``G`` (``sum g g^T``) over
    ``g_count`` draws in ``g_calls`` backward calls of ``g_samples`` samples."""

    __slots__ = ("A", "a_count", "G", "g_count", "g_calls", "g_samples", "reduced")

    def __init__(self) -> None:
        self.A: torch.Tensor | None = None
        self.a_count = 0
        self.G: torch.Tensor | None = None
        self.g_count = 0
        self.g_calls = 0
        self.g_samples = 0
        # after StepStatistics.reduce: G is the sum over ranks of each rank's G times its samples
        self.reduced = False

    def weighted_G(self) -> torch.Tensor:
        """This rank's output factor times its samples, ``g_samples^2 sum g g^T / draws``: summed over
        ranks and divided by all ranks' samples it is the factor of the union of their batches, each
        rank's gradients being those of its own mean loss."""
        draws = self.g_count / self.g_calls
        return self.G * (self.g_samples**2 / draws)

    def factor_sums(self, stats_scale: float = 1.0) -> dict[str, tuple[torch.Tensor, float]] | None:
        """``{"A": (sum, divisor), "G": (sum, divisor)}``: the step's factors are ``sum / divisor``; G's
        divisor folds in the loss scale ``stats_scale`` of a GradScaler. None when the step has no
        complete statistics (an ``mc_backward`` without the backward that takes the inputs)."""
        if self.G is None or self.a_count == 0:
            return None
        if self.reduced:
            g_divisor = self.g_samples * stats_scale**2
        else:
            g_divisor = self.g_count / self.g_calls / self.g_samples  # draws per call / samples
            g_divisor *= stats_scale**2
        return {"A": (self.A, float(self.a_count)), "G": (self.G, g_divisor)}


class StepStatistics:
    """The statistics of one optimizer step: per Kronecker layer a :class:`LayerStatistics`, and per
    diagonal-block parameter the samples its module saw (with the parameter's name for messages)."""

    def __init__(self) -> None:
        self.layers: dict[int, LayerStatistics] = {}  # id(weight) -> sums
        self.diag_counts: dict[int, tuple[int, str]] = {}  # id(param) -> (samples, "Module.name")

    def layer(self, key: int) -> LayerStatistics:
        """The sums of the layer with weight ``id`` ``key``, created empty at its first use."""
        stats = self.layers.get(key)
        if stats is None:
            stats = self.layers[key] = LayerStatistics()
        return stats

    def count_samples(self, key: int, n: int, name: str) -> None:
        """Add ``n`` samples seen by the diagonal-block parameter with ``id`` ``key``."""
        seen, _ = self.diag_counts.get(key, (0, ""))
        self.diag_counts[key] = (seen + n, name)

    def __bool__(self) -> bool:
        return bool(self.layers)

    def reduce(self, layers: Sequence[tuple[int, int, int]], diagonal: Sequence[int], like: torch.Tensor,
               group: Any = None) -> int:
        """Sum the statistics over the ranks of ``group``, in one bucketed all-reduce; a no-op without one.

        ``layers`` lists ``(key, dim A, dim G)`` and ``diagonal`` the diagonal-block keys, in the same
        order on every rank (parameter order, not ``id``s, which differ between processes); a layer this
        rank has no statistics for takes part with zeros. Afterwards ``A`` and the counts are sums over
        ranks and ``G`` the sample-weighted sum of the ranks' factors (:meth:`LayerStatistics.weighted_G`),
        so the factors are those of the union of all ranks' samples. ``like``: a tensor of the
        statistics' dtype and device. Returns the bytes this rank put into the collective."""
        if not distributed.active(group):
            return 0
        parts: list[torch.Tensor] = []
        counts: list[float] = []
        for key, dim_a, dim_g in layers:
            stats = self.layers.get(key)
            complete = stats is not None and stats.G is not None and stats.a_count > 0
            parts.append(stats.A if complete else like.new_zeros(dim_a, dim_a))
            parts.append(stats.weighted_G().to(like.dtype) if complete else like.new_zeros(dim_g, dim_g))
            counts += [stats.a_count, stats.g_samples] if complete else [0, 0]
        counts += [self.diag_counts.get(key, (0, ""))[0] for key in diagonal]
        parts.append(torch.tensor(counts, dtype=like.dtype, device=like.device))
        summed = distributed.sum_across(parts, group)
        totals = summed[-1].tolist()
        for i, (key, _, _) in enumerate(layers):
            stats = self.layer(key)
            stats.A, stats.G = summed[2 * i], summed[2 * i + 1]
            stats.a_count, stats.g_samples = int(totals[2 * i]), int(totals[2 * i + 1])
            stats.g_count = stats.g_calls = 1
            stats.reduced = True
        for j, key in enumerate(diagonal):
            _, name = self.diag_counts.get(key, (0, ""))
            self.diag_counts[key] = (int(totals[2 * len(layers) + j]), name)
        return sum(t.numel() for t in parts) * like.element_size()

    def clear(self) -> None:
        self.layers.clear()
        self.diag_counts.clear()


# ---------------------------------------------------------------------------- inversion
def _pi(mean_eig_A: torch.Tensor, mean_eig_G: torch.Tensor) -> torch.Tensor:
    return ((mean_eig_A / mean_eig_G.clamp_min(1e-30)).clamp_min(1e-30)).sqrt()


def factored_inverses(
    eig_A: tuple[torch.Tensor, torch.Tensor], eig_G: tuple[torch.Tensor, torch.Tensor], damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A + pi sqrt(d) I)^{-1}`` and ``(G + sqrt(d)/pi I)^{-1}`` from ``(eigenvalues, eigenvectors)``
    of ``A`` and ``G``, with ``pi = sqrt((tr A / dim A) / (tr G / dim G))``: the factored Tikhonov
    damping of Martens & Grosse (2015, section 6.3)."""
    pi = _pi(eig_A[0].mean(), eig_G[0].mean())
    return _inverse_from_eig(eig_A, pi * damping**0.5), _inverse_from_eig(eig_G, damping**0.5 / pi)


def _inverse_from_eig(eig: tuple[torch.Tensor, torch.Tensor], shift: Any) -> torch.Tensor:
    """``(M + shift I)^{-1}`` from ``(eigenvalues, eigenvectors)`` of a symmetric ``M``."""
    lam, Q = eig
    return (Q / (lam + shift)) @ Q.T


def factored_inverses_cholesky(
    A: torch.Tensor, G: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The :func:`factored_inverses` from the factors themselves, by Cholesky (several times
    cheaper than an eigendecomposition); a factor that is not numerically positive definite
    after damping falls back to its eigendecomposition with the eigenvalues clamped at 0."""
    return factored_inverses_cholesky_many([(A, G, damping)])[0]


def factored_inverses_cholesky_many(
    factors: list[tuple[torch.Tensor, torch.Tensor, float]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`factored_inverses_cholesky` of several layers' ``(A, G, damping)``, with one read of
    the device for all their factorizations' success flags (instead of one per factor)."""
    pairs = []
    for A, G, damping in factors:
        pi = _pi(A.diagonal().mean(), G.diagonal().mean())
        pairs += [(A, pi * damping**0.5), (G, damping**0.5 / pi)]
    inverses = _damped_inverses(pairs)
    return list(zip(inverses[::2], inverses[1::2]))


def _damped_inverses(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """``(M + shift I)^{-1}`` for each ``(M, shift)``, by Cholesky; the success flags are read in one
    synchronisation, and a factorization that failed falls back to ``eigh`` with clamped eigenvalues."""
    if not pairs:
        return []
    factorizations = []
    for M, shift in pairs:
        damped = M.clone()
        damped.diagonal().add_(shift)
        factorizations.append(torch.linalg.cholesky_ex(damped))
    infos = torch.stack([info for _, info in factorizations]).tolist()
    out = []
    for (M, shift), (L, _), info in zip(pairs, factorizations, infos):
        if info == 0:
            out.append(torch.cholesky_inverse(L))
        else:
            lam, Q = torch.linalg.eigh(M)
            out.append(_inverse_from_eig((lam.clamp_min(0.0), Q), shift))
    return out


def bias_blocks(A_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks ``(P [d, d], q [d], r [])`` of ``A_inv = [[P, q], [q^T, r]]`` ``[d + 1, d + 1]`` (a bias
    layer's inverse input factor), as views, for :func:`factored_product`: a caller that applies the same
    inverse at many steps takes them once instead of slicing at every step."""
    d = A_inv.shape[0] - 1
    return A_inv[:d, :d], A_inv[:d, d], A_inv[d, d]


def factored_product(
    G_inv: torch.Tensor, gw: torch.Tensor, gb: torch.Tensor | None, A_inv: torch.Tensor,
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's K-FAC update ``G_inv [gw | gb] A_inv`` (weight gradient ``gw`` ``[out, in]``, bias
    gradient ``gb`` ``[out]`` or None), as its weight and bias parts, without forming
    ``[gw | gb]``: with ``A_inv = [[P, q], [q^T, r]]`` the weight part is
    ``G_inv (gw P + gb q^T)`` and the bias part ``G_inv (gw q + r gb)``. The matrix products then
    keep the layer's own sizes (often multiples of the SIMD width) instead of one more column.
    ``blocks``: :func:`bias_blocks` of ``A_inv``, when the caller has them."""
    # torch.mm/mv: what ``@`` dispatches to for these ranks, without Tensor.__matmul__'s Python wrapper
    if gb is None:
        return (torch.mm(torch.mm(G_inv, gw), A_inv) if gw.dim() == 2 else G_inv @ gw @ A_inv), None
    P, q, r = bias_blocks(A_inv) if blocks is None else blocks
    T = torch.mm(gw, P).addr_(gb, q)
    t = torch.addcmul(torch.mv(gw, q), gb, r)  # r stays a tensor: no device sync
    return torch.mm(G_inv, T), torch.mv(G_inv, t)


def kronecker_solve(
    M: torch.Tensor,
    eig_A: tuple[torch.Tensor, torch.Tensor],
    eig_G: tuple[torch.Tensor, torch.Tensor],
    damping: float,
    factored: bool,
    power: float = -1,
) -> torch.Tensor:
    """``(A ⊗ G + d I)^{power}`` (or, ``factored``, the :func:`factored_inverses` product, ``power=-1``
    only) applied to matrices ``M`` ``[..., out, in]`` as ``G^p M A^p``, given ``(eigenvalues,
    eigenvectors)``."""
    if factored:
        A_inv, G_inv = factored_inverses(eig_A, eig_G, damping)
        return G_inv @ M @ A_inv
    (la, Qa), (lg, Qg) = eig_A, eig_G
    denom = lg[:, None] * la[None, :] + damping
    if power == -1:
        return Qg @ ((Qg.T @ M @ Qa) / denom) @ Qa.T
    return Qg @ ((Qg.T @ M @ Qa) * denom.pow(power)) @ Qa.T


# ---------------------------------------------------------------------------- blocks
#: The keys a :class:`KroneckerFactors` block keeps in its store.
FACTOR_KEYS = ("A", "G", "inv_A", "inv_G", "inv_damping", "eig_A", "eig_G")


class KroneckerFactors:
    """One layer's ``A ⊗ G`` block (kfac-jax's curvature block): update the estimate, multiply by a
    matrix power.

    The block is a view over a mapping ``store`` that holds its tensors under :data:`FACTOR_KEYS`: the
    operator gives it a dict of its own, the optimizer a parameter's state (so ``state_dict`` carries
    the factors, and a ``collections.ChainMap`` of held-back entries over the state previews a step
    that may still be skipped). Inverses and eigendecompositions are cached in the store until the
    owner refreshes them: the optimizer on its inverse schedule, the operator when the factors change
    (:meth:`set`).
    """

    __slots__ = ("store",)

    def __init__(self, store: MutableMapping[str, Any]) -> None:
        self.store = store

    @property
    def A(self) -> torch.Tensor:
        return self.store["A"]

    @property
    def G(self) -> torch.Tensor:
        return self.store["G"]

    def set(self, A: torch.Tensor, G: torch.Tensor) -> None:
        """Replace the factors, dropping what was derived from the old ones."""
        self.store["A"], self.store["G"] = A, G
        for key in ("eig_A", "eig_G", "inv_A", "inv_G", "inv_damping"):
            self.store.pop(key, None)

    def update(self, sums: dict[str, tuple[torch.Tensor, float]], decay: float) -> None:
        """Moving averages ``A <- decay A + (1 - decay) sum / divisor`` (and ``G``), in place: no
        factor-sized temporaries. The first update's sums are not used again: they become the factors.
        Cached inverses stay until refreshed (the optimizer's inverse schedule)."""
        for name, (total, divisor) in sums.items():
            if name in self.store:
                self.store[name].mul_(decay).add_(total, alpha=(1 - decay) / divisor)
            else:
                self.store[name] = total.div_(divisor)

    def eigendecompositions(self) -> tuple:
        """``(eigh(A), eigh(G))``, cached in the store until the factors are replaced."""
        if "eig_A" not in self.store:
            self.store["eig_A"], self.store["eig_G"] = torch.linalg.eigh(self.A), torch.linalg.eigh(self.G)
        return self.store["eig_A"], self.store["eig_G"]

    def clamped_eigendecompositions(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Fresh ``eig_A``/``eig_G`` entries with the eigenvalues clamped at 0 (a positive damped spectrum
        for a preconditioner), returned for the caller to store, not stored."""
        entries = {}
        for name in ("A", "G"):
            lam, Q = torch.linalg.eigh(self.store[name])
            entries[f"eig_{name}"] = (lam.clamp_min(0.0), Q)
        return entries

    def multiply(self, W: torch.Tensor, b: torch.Tensor | None = None, *, power: float = 1, damping: float = 0.0,
                 factored: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(A ⊗ G + damping I)^power`` applied to ``[W | b]`` as ``G^p [W | b] A^p``, returned as its weight
        and bias parts (``W`` ``[..., out, in]``, ``b`` ``[out]`` or None when ``W`` has no bias column or
        already holds it).

        ``power=1`` without damping: ``G M A``. Other powers use the eigendecompositions (the stored
        ones when present). ``factored=True`` (``power=-1`` only): ``(A + pi sqrt(d) I)^{-1}`` and
        ``(G + sqrt(d)/pi I)^{-1}`` (Martens & Grosse, 2015, section 6.3), the stored inverses when
        they were made for this ``damping``."""
        if power == 1 and damping == 0 and not factored:
            M = W if b is None else torch.cat([W, b[..., None]], dim=-1)
            return _split(self.G @ M @ self.A, W, b)
        if factored:
            if power != -1:
                raise ValueError(f"factored damping defines only power=-1, got power={power!r}")
            if "inv_A" in self.store and self.store.get("inv_damping") == damping:
                return factored_product(self.store["inv_G"], W, b, self.store["inv_A"])
            A_inv, G_inv = factored_inverses(*self.eigendecompositions(), damping)
            return factored_product(G_inv, W, b, A_inv)
        M = W if b is None else torch.cat([W, b[:, None]], dim=1)
        return _split(kronecker_solve(M, *self.eigendecompositions(), damping, False, power), W, b)


def _split(R: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``R = [W' | b']`` as ``(W', b')``, or ``(R, None)`` without a bias column."""
    if b is None:
        return R, None
    d = W.shape[-1]
    return R[..., :d], R[..., d]


def damped_inverse_entries(blocks: list[KroneckerFactors], damping: float) -> list[dict[str, Any]]:
    """Fresh ``inv_A``/``inv_G``/``inv_damping`` entries of several blocks under factored Tikhonov
    damping, by Cholesky with one read of the device for all of them; returned for the caller to
    store (an optimizer stores them once its step is known to be taken)."""
    pairs = factored_inverses_cholesky_many([(blk.A, blk.G, damping) for blk in blocks])
    return [{"inv_A": inv_A, "inv_G": inv_G, "inv_damping": damping} for inv_A, inv_G in pairs]


class DiagonalBlock:
    """The diagonal fallback for parameters without a Kronecker structure: ``D`` (a diagonal of the
    curvature, shaped like the parameter), multiplied as ``(D + damping)^power``."""

    __slots__ = ("D",)

    def __init__(self, D: torch.Tensor | None) -> None:
        self.D = D

    def update(self, D: torch.Tensor, decay: float) -> torch.Tensor:
        """Moving average ``D <- decay D + (1 - decay) D_new``; the first estimate is taken as is."""
        self.D = D if self.D is None else decay * self.D + (1 - decay) * D
        return self.D

    def multiply(self, v: torch.Tensor, *, power: float = 1, damping: float = 0.0) -> torch.Tensor:
        """``(D + damping)^power * v`` elementwise."""
        if power == 1 and damping == 0:
            return self.D * v.to(self.D.dtype)
        if power == -1:
            return v / (self.D + damping)
        return v * (self.D + damping).pow(power)
