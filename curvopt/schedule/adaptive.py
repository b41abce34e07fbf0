"""ABS and ABSA: grow the batch when the top Hessian eigenvalue says the landscape has flattened
(Yao, Gholami, Keutzer, Mahoney, "Large batch size training of neural networks with adversarial
training and second-order information", arXiv:1810.01021)."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
from torch import nn

from curvopt.curvature.model_state import curvature_pass
from curvopt.curvature.params import unwrap_model
from curvopt.errors import NonFiniteLossError, OptionError
from curvopt.schedule.base import LR_SCALINGS, BatchSizeSchedule, _positive_int, lr_factor
from curvopt.schedule.fgsm import FGSM

#: Seed offset of the probe set's draw (kept apart from the sampler's permutations).
PROBE_SEED = 7_919


class AdaptiveBatchSize(BatchSizeSchedule):
    """ABS: the batch grows by ``growth`` when the top eigenvalue of the curvature has fallen to
    ``1/kappa`` of its reference; with ``adversarial=FGSM(...)`` it is ABSA.

    At each check (the end of each epoch, or every ``check_every`` steps) the top eigenvalue of
    ``curvopt.curvature(curvature, ...)`` on a **fixed** probe set (``probe_size`` training samples
    drawn once with ``seed``) is estimated by Lanczos, warm-started from the previous check's Ritz
    vector, with the model in eval mode inside
    :func:`~curvopt.curvature.model_state.curvature_pass` (mode, buffers, RNG restored). Then:

    * the first check sets the reference (and counts as a check without growth);
    * ``lambda <= reference / kappa`` and the drop ``reference - lambda`` exceeds twice its standard
      error: the batch grows and the reference resets to ``lambda``;
    * else, at the ``duration``-th check without growth, the batch grows and the reference is kept;
    * growth is capped at ``max_batch_size`` (the history then says ``"cap"`` where the batch would have
      grown, and the duration count restarts);
    * on growth every param group's lr is multiplied by ``lr_factor(B'/B, lr_scaling)``;
    * a non-finite eigenvalue (or loss) on the probe set: a warning, no growth, the counters and the
      reference unchanged; training continues.

    Standard error: the Lanczos residual ``||H x - theta x||`` of the Ritz pair, which bounds the
    distance from ``theta`` to an eigenvalue of the probe set's (fixed) operator. Because every check
    uses the same probe samples, the sampling noise of the probe set is common to the reference and the
    new estimate and does not enter the difference; the drop's error is ``sqrt(se**2 + se_ref**2)``.

    With ``blockwise=True`` the eigenvalue is computed per block of the operator (per module) and the
    eigenvalue rule fires only when every block has dropped (the landscape flattened everywhere).

    Args:
        batch_size, max_batch_size: Initial and largest batch sizes.
        curvature: Registry name of the backend (``"hessian"``, ``"ggn"``, ...).
        curvature_options: Keyword options of the backend (``{"cache": True}`` makes the probe's
            products reuse each probe batch's forward pass: faster, holding ``probe_size`` samples' context).
        probe_size: Samples in the probe set (default 1024, at most the dataset).
        kappa: Drop ratio that triggers growth (> 1).
        growth: Batch growth factor (> 1).
        duration: Checks without growth after which the batch grows anyway.
        check_every: Check every this many optimizer steps (default: at each :meth:`step`).
        lr_scaling: ``"linear"``, ``"sqrt"`` or ``"none"``.
        blockwise: Per-block eigenvalues (see above).
        adversarial: An :class:`~curvopt.FGSM` for ABSA.
        lanczos_steps: Most operator products per eigenvalue.
        tol: Lanczos' relative residual tolerance.
        **kwargs: As for :class:`~curvopt.schedule.base.BatchSizeSchedule`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, loss_fn: Any, dataset: Any, *,
                 batch_size: int, max_batch_size: int, curvature: str = "hessian",
                 curvature_options: dict[str, Any] | None = None, probe_size: int = 1024, kappa: float = 2.0,
                 growth: float = 2.0, duration: int = 10, check_every: int | None = None,
                 lr_scaling: str = "linear", blockwise: bool = False, adversarial: FGSM | None = None,
                 lanczos_steps: int = 20, tol: float = 1e-4, **kwargs: Any) -> None:
        super().__init__(optimizer, model, loss_fn, dataset, batch_size=batch_size,
                         max_batch_size=max_batch_size, **kwargs)
        from curvopt.curvature.registry import check_options, curvature_class

        # an unknown name or option fails now, listing the valid ones, not at the first check
        check_options(curvature_class(curvature), dict(curvature_options or {}))
        for name, value in (("kappa", kappa), ("growth", growth)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1:
                raise OptionError(f"{name} must be a number > 1, got {value!r}")
        if lr_scaling not in LR_SCALINGS:
            raise OptionError(f"lr_scaling={lr_scaling!r}; valid: {', '.join(LR_SCALINGS)}")
        if lr_scaling != "none":
            self._require_lr(f"lr_scaling={lr_scaling!r}")
        if adversarial is not None and not isinstance(adversarial, FGSM):
            raise OptionError(f"adversarial must be a curvopt.FGSM, got {type(adversarial).__name__}")
        self.curvature, self.curvature_options = curvature, dict(curvature_options or {})
        self.kappa, self.growth = float(kappa), float(growth)
        self.duration = _positive_int("duration", duration)
        self.check_every = None if check_every is None else _positive_int("check_every", check_every)
        self.lr_scaling, self.blockwise = lr_scaling, bool(blockwise)
        self.lanczos_steps, self.tol = _positive_int("lanczos_steps", lanczos_steps), float(tol)
        self.probe_size = min(_positive_int("probe_size", probe_size), len(self.data))
        if self.probe_size < self.world:
            raise OptionError(f"probe_size={self.probe_size} is shared by {self.world} ranks: it must be at least "
                              f"{self.world}")
        self.adversarial = self._with_range(adversarial)
        self.reference: list[float] | None = None
        self.reference_se: list[float] | None = None
        self._since_growth = 0
        self._growths = 0
        self._ritz: list[torch.Tensor] | None = None
        self._last_check = -1  # iterations at the last check (mid-epoch checks happen once)

    def _with_range(self, adv: FGSM | None) -> FGSM | None:
        if adv is None or adv.clamp is not None:
            return adv
        if self.data.tensors is None:
            raise OptionError("FGSM needs the data's range for a dataset that is not (X, y) tensors: "
                              "pass curvopt.FGSM(eps, clamp=(lo, hi))")
        X = self.data.tensors[0]
        return FGSM(adv.eps, adv.fraction, clamp=(float(X.min()), float(X.max())))

    # --- probe ----------------------------------------------------------------------------------------
    def probe_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed probe set (a seeded draw of ``probe_size`` samples), in micro-batches on the model's
        device; on several ranks, this rank's contiguous share of it (the operator's data loop sums the
        shares, so every rank sees the curvature of the whole probe set)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + PROBE_SEED)
        idx = torch.randperm(len(self.data), generator=g)[:self.probe_size]
        if self.world > 1:
            idx = torch.tensor_split(idx, self.world)[self.rank]
        mb = self.micro_batch_size or len(idx)
        device = self.device
        return [tuple(t.to(device) for t in self.data.fetch(idx[s:s + mb])) for s in range(0, len(idx), mb)]

    def probe(self) -> tuple[list[float], list[float]]:
        """Top eigenvalue(s) of the probe set's curvature and their standard errors (one per block with
        ``blockwise``); the model is left as it was found."""
        import curvopt
        from curvopt.linalg.lanczos import lanczos

        data = self.probe_batches()
        model = unwrap_model(self.model)
        options = dict(self.curvature_options)
        if self.world > 1:
            options.setdefault("process_group", self.process_group)
        eigs, ses, vecs = [], [], []
        with curvature_pass(model):
            model.eval()
            op = curvopt.curvature(self.curvature, model, self.loss_fn, data, **options)
            ops = ([curvopt.curvature(self.curvature, model, self.loss_fn, data,
                                      params=list(b.param_names), **options) for b in op.blocks]
                   if self.blockwise else [op])
            for i, o in enumerate(ops):
                P = o.shape[0]
                v0 = self._ritz[i] if self._ritz is not None and i < len(self._ritz) else None
                if v0 is not None and (v0.numel() != P or not bool(torch.isfinite(v0).all())):
                    v0 = None
                gen = torch.Generator(device=self.device).manual_seed(self.seed + i)
                # curvopt.top_eigenvalues takes no start vector; its Lanczos does (warm start)
                res = lanczos(o, 1, tol=self.tol, max_iter=self.lanczos_steps, min_iter=min(3, P),
                              generator=gen, v0=None if v0 is None else v0.to(self.device))
                eigs.append(float(res.eigenvalues[0]))
                ses.append(float(res.residuals[0]))
                vecs.append(res.eigenvectors[:, 0].detach().cpu().clone())
        if all(math.isfinite(e) for e in eigs):
            self._ritz = vecs
        return eigs, ses

    # --- the rule -------------------------------------------------------------------------------------
    @property
    def adversarial_fraction(self) -> float:
        """The share of the current batches replaced by FGSM examples."""
        if self.adversarial is None:
            return 0.0
        return self.adversarial.fraction_at(self._growths, self.batch_size >= self.max_batch_size,
                                            self.epoch, self.epochs)

    def _grow(self) -> None:
        new = min(int(round(self.batch_size * self.growth)), self.max_batch_size)
        self._scale_lr(lr_factor(new / self.batch_size, self.lr_scaling))
        self.batch_size = new
        self._growths += 1
        self._since_growth = 0

    def check(self) -> dict[str, Any]:
        """Probe and apply the growth rule now; returns (and appends to :attr:`history`) the record."""
        t0 = time.perf_counter()
        try:
            eigs, ses = self.probe()
        except NonFiniteLossError:
            eigs, ses = [math.nan], [math.nan]
        seconds = time.perf_counter() - t0
        reference = None if self.reference is None else list(self.reference)
        reason = ""
        if not all(math.isfinite(e) and math.isfinite(s) for e, s in zip(eigs, ses)):
            warnings.warn(f"AdaptiveBatchSize: the top eigenvalue on the probe set is not finite ({eigs}) at "
                          f"epoch {self.epoch}, iteration {self.iterations}; the batch size stays "
                          f"{self.batch_size} and training continues", RuntimeWarning, stacklevel=2)
            reason = "non-finite"
        else:
            first = self.reference is None or len(self.reference) != len(eigs)
            if first:
                self.reference, self.reference_se = list(eigs), list(ses)
            dropped = not first and all(e <= r / self.kappa and r - e > 2 * math.hypot(s, rs)
                                        for e, s, r, rs in zip(eigs, ses, self.reference, self.reference_se))
            self._since_growth += 0 if dropped else 1
            want = "eigenvalue" if dropped else "duration" if self._since_growth >= self.duration else ""
            if want and self.batch_size >= self.max_batch_size:
                reason = "cap"
                self._since_growth = 0
            elif want:
                self._grow()
                reason = want
                if want == "eigenvalue":
                    self.reference, self.reference_se = list(eigs), list(ses)
        self._last_check = self.iterations
        record = {"epoch": self.epoch, "iterations": self.iterations, "batch_size": self.batch_size,
                  "lr": self.lr, "eigenvalue": eigs if self.blockwise else eigs[0],
                  "std_error": ses if self.blockwise else ses[0],
                  "reference": (reference if self.blockwise or reference is None else reference[0]),
                  "reason": reason, "adversarial_fraction": self.adversarial_fraction,
                  "probe_seconds": seconds}
        self.history.append(record)
        return record

    def _before_batch(self) -> None:
        if (self.check_every is not None and self.iterations > 0 and self.iterations % self.check_every == 0
                and self._last_check != self.iterations):
            self.check()

    def _end_of_epoch(self) -> None:
        if self.check_every is None:
            self.check()

    def _transform_batch(self, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the first m samples of the GLOBAL batch are made adversarial: this rank's share holds those of
        # them that fall in it, so that any number of ranks perturbs the same samples as one process
        m = int(round(self.adversarial_fraction * self._global_batch)) - self._share_start
        m = max(0, min(m, len(X)))
        if m == 0:
            return X, y
        X = X.clone()
        device = self.device
        X[:m] = self.adversarial.perturb(unwrap_model(self.model), self.loss_fn, X[:m].to(device),
                                         y[:m].to(device), micro_batch_size=self.micro_batch_size).to(X.device)
        return X, y

    # --- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(reference=self.reference, reference_se=self.reference_se, since_growth=self._since_growth,
                     growths=self._growths, ritz=self._ritz, last_check=self._last_check)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.reference = None if state["reference"] is None else [float(x) for x in state["reference"]]
        self.reference_se = None if state["reference_se"] is None else [float(x) for x in state["reference_se"]]
        self._since_growth = int(state["since_growth"])
        self._growths = int(state["growths"])
        self._ritz = None if state["ritz"] is None else [v.clone() for v in state["ritz"]]
        self._last_check = int(state["last_check"])
