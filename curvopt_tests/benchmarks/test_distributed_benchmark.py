"""The data-parallel benchmark runs 1 and 2 gloo processes (tiny sizes) and reports consistent figures: one
collective per product, the same products and training on 1 and 2 processes, and each ``distribute``
mode's bytes where they belong."""

import json
import math

import pytest

from curvopt_tests.benchmarks import load_benchmark

pytestmark = pytest.mark.distributed


def test_distributed_benchmark_quick(tmp_path, capsys):
    module = load_benchmark("distributed")
    result = module.main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text())["kfac"] == result["kfac"]
    products = result["products"]
    assert [(r["model"], r["backend"], r["cache"]) for r in products] == [
        (m, b, c) for m in module.MODELS for b in module.BACKENDS for c in (False, True)]
    for r in products:
        assert r["collectives_per_product_1"] == [0]  # no group: no collective
        assert r["collectives_per_product_2"] == [1]  # one per product, uncached and cached
        assert all(0 < r[f"products_per_s_{w}"] < math.inf for w in (1, 2))
        assert 0 <= r["all_reduce_share_2"] <= 1
        # the same product on every rank and on 1 process (float32 sums in another order)
        low, high = r["norm_2"]
        assert high == pytest.approx(low, rel=1e-5) and low == pytest.approx(r["norm_1"][0], rel=1e-5)

    kfac = result["kfac"]
    assert [(r["model"], r["processes"], r["distribute"]) for r in kfac] == [
        *[(m, 1, "none") for m in module.MODELS], *[(m, 2, d) for m in module.MODELS for d in module.MODES]]
    for model in module.MODELS:
        one, *modes = [r for r in kfac if r["model"] == model]
        assert one["kfac_bytes_per_step"] == 0 and all(0 < r["steps_per_s"] < math.inf for r in (one, *modes))
        factors = modes[0]["bytes_per_factor_update"]
        assert factors > 0
        for r in modes:
            assert r["bytes_per_factor_update"] == factors  # the statistics are summed in every mode
            assert r["loss_after"] == pytest.approx(one["loss_after"], rel=1e-5)  # the same training
            assert 0 <= r["kfac_all_reduce_share"] <= 1
        by_mode = {r["distribute"]: r for r in modes}
        # comm_opt alone sends inverses; mem_opt alone sends preconditioned gradients, one per parameter
        # (every parameter of these models is in a Kronecker layer)
        inverses = {mode: r["bytes_per_inverse_update"] for mode, r in by_mode.items()}
        updates = {mode: r["update_bytes_per_step"] for mode, r in by_mode.items()}
        assert inverses["replicate"] == inverses["mem_opt"] == 0 < inverses["comm_opt"]
        assert updates["replicate"] == updates["comm_opt"] == 0 < updates["mem_opt"]
        assert updates["mem_opt"] == by_mode["mem_opt"]["ddp_grad_bytes_per_step"]
    out = capsys.readouterr().out
    assert "| MLP 40-256-256-10 | `hessian` | False |" in out and "| CNN Conv1d | 2 | mem_opt |" in out
