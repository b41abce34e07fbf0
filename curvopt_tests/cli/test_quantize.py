"""``curvopt quantize``: the default pipeline end to end on a tiny setting, budgets in bytes, fixed layers,
QAT columns, the example config and ``--help``."""

import json
import math
from pathlib import Path

import pytest
import torch

from curvopt.cli import QUANTIZE_DEFAULTS, load_config, main
from curvopt_tests.cli.configs import write_config as _write

#: The default config, made tiny: the CNN with 2 convolutions on digits, 1 epoch, 4 probes, 256 samples.
TINY = """
[model]
conv_layers = 2
train_epochs = 1
[data]
dataset = "digits"
batch_size = 128
[sensitivity]
probes = 4
samples = 256
[allocation]
random = 3
[output]
progress = false
plots = {plots}
"""




def _plots() -> str:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "false"
    return "true"


def test_default_pipeline_end_to_end(tmp_path, capsys):
    plots = _plots()
    out_dir = tmp_path / "out"
    assert main(["quantize", "--config", _write(tmp_path, TINY.format(plots=plots)), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    for label in ("fp32", "uniform 2-bit", "uniform 3-bit", "uniform 4-bit", "uniform 8-bit", "hawq_v2 (ilp)",
                  "random (n=3)", "measured (ilp)", "3-bit avg"):
        assert label in out, label
    result = json.loads((out_dir / "quantize.json").read_text())
    assert {"model", "score", "curvature", "calibration_samples", "fixed", "sensitivity", "score_table",
            "measured_table", "fp32", "uniform", "budgets", "pareto", "finetune_epochs", "config"} <= set(result)
    assert result["score"] == "hawq_v2" and result["curvature"] == "hessian"
    assert result["calibration_samples"] == 256 and result["finetune_epochs"] == 0
    weights = 1 * 32 * 5 + 32 * 32 * 5 + 32 * 32 * 10  # two 5-tap convolutions, a linear layer on 32 x 32
    assert result["model"]["weights"] == weights and list(result["model"]["quantizable"]) == ["1", "3", "6"]
    assert result["fp32"]["size_bytes"] == 4 * weights and result["fp32"]["compression"] == 1.0

    uniform = {r["method"]: r for r in result["uniform"]}
    assert list(uniform) == ["uniform 2-bit", "uniform 3-bit", "uniform 4-bit", "uniform 8-bit"]
    for b in (2, 3, 4, 8):
        r = uniform[f"uniform {b}-bit"]
        assert r["size_bits"] == b * weights and r["average_bits"] == b and r["compression"] == 32 / b
        assert set(r["bits"].values()) == {b}
    for r in [result["fp32"], *result["uniform"]]:
        assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["loss"])

    (budget,) = result["budgets"]  # neither average_bits nor size_bytes: one budget, 3 bits on average
    three = uniform["uniform 3-bit"]
    # the budget is exactly the uniform 3-bit plan's size, and every allocation at it fits
    assert budget["uniform_bits"] == 3 and budget["size_bits"] == three["size_bits"]
    assert budget["size_bytes"] == three["size_bytes"]
    mixed, measured, randoms = budget["mixed"], budget["measured"], budget["random"]["rows"]
    assert mixed["size_bits"] <= three["size_bits"] and measured["size_bits"] <= three["size_bits"]
    assert mixed["plan"]["method"] == "ilp" and mixed["plan"]["bits"] == mixed["bits"]
    assert len(randoms) == budget["random"]["n"] == 3
    assert all(r["size_bits"] <= three["size_bits"] for r in randoms)
    # the integer program minimises the summed score over all plans of that size: uniform 3-bit and the
    # random plans are among them, and the objective is computed from the same score table
    assert mixed["objective"] <= three["objective"] + 1e-12
    assert all(mixed["objective"] <= r["objective"] + 1e-12 for r in randoms)
    table = result["score_table"]
    assert mixed["objective"] == pytest.approx(sum(table[n][str(b)] for n, b in mixed["bits"].items()))
    assert budget["random"]["accuracy_mean"] == pytest.approx(sum(r["accuracy"] for r in randoms) / 3)
    # the measured plan minimises the measured losses
    mtable = result["measured_table"]
    assert sum(mtable[n][str(b)] for n, b in measured["bits"].items()) <= \
        sum(mtable[n][str(b)] for n, b in mixed["bits"].items()) + 1e-12

    frontier = result["pareto"]
    sizes, objectives = [p["size_bytes"] for p in frontier], [p["objective"] for p in frontier]
    assert sizes == sorted(sizes) and all(a > b for a, b in zip(objectives, objectives[1:]))
    if plots == "true":
        assert (out_dir / "pareto.png").stat().st_size > 0
        assert any("accuracy" in p for p in frontier)


@pytest.mark.filterwarnings("ignore:sensitivity.*is negative")  # an untrained model's curvature is indefinite
@pytest.mark.parametrize("score,activation_bits", [("gptq", 0), ("measured", 8)])
def test_size_budgets_fixed_layers_pareto_and_qat(tmp_path, capsys, score, activation_bits):
    from curvopt.models import mlp

    torch.manual_seed(3)
    ckpt = tmp_path / "model.pt"
    torch.save(mlp((64, 16, 16, 10)).state_dict(), ckpt)
    weights = 64 * 16 + 16 * 16 + 16 * 10
    text = f"""
[model]
arch = "mlp"
hidden = [16, 16]
checkpoint = "{ckpt}"
[data]
dataset = "digits"
batch_size = 128
[sensitivity]
score = "{score}"
probes = 3
samples = 128
[quantizer]
activation_bits = {activation_bits}
[allocation]
size_bytes = [{weights // 2}, 600]
method = "pareto"
fixed = {{ last = 8 }}
random = 2
[finetune]
epochs = 1
batch_size = 256
[output]
progress = false
plots = false
"""
    assert main(["quantize", "--config", _write(tmp_path, text), "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "loaded" in out and "QAT acc" in out and f"{score} (pareto)" in out
    result = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert result["fixed"] == {"4": 8} and result["finetune_epochs"] == 1 and result["score"] == score
    first, second = result["budgets"]
    assert first["uniform_bits"] == 4 and first["size_bits"] == 4 * weights  # 720 B: uniform 4-bit's size
    assert second["uniform_bits"] is None and second["size_bits"] == 600 * 8
    for budget in (first, second):
        rows = [budget["mixed"], budget["measured"], *budget["random"]["rows"]]
        assert all(r["bits"]["4"] == 8 and r["size_bits"] <= budget["size_bits"] for r in rows)
        assert all(0 <= r["qat_accuracy"] <= 1 and math.isfinite(r["qat_loss"]) for r in rows)
        assert budget["mixed"]["plan"]["method"] == "pareto"
        if score == "measured":  # the configured score is the measured one: one allocation
            assert budget["measured"]["bits"] == budget["mixed"]["bits"]
        assert "qat_accuracy_mean" in budget["random"]
    assert all("qat_accuracy" in r for r in result["uniform"]) and "qat_accuracy" not in result["fp32"]


def test_help_names_the_command_and_its_outputs(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "quantize" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    assert "--config" in text and "quantize.json" in text and "pareto.png" in text and "[allocation]" in text


def test_example_config_is_the_defaults(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "quantize.toml"
    assert load_config(str(example), QUANTIZE_DEFAULTS) == load_config(None, QUANTIZE_DEFAULTS)


def test_scalar_budget_becomes_a_list(tmp_path):
    config = load_config(_write(tmp_path, "[allocation]\naverage_bits = 4\n"), QUANTIZE_DEFAULTS)
    assert config["allocation"]["average_bits"] == [4.0]
