"""``curvopt analyze``: a small end-to-end run, checkpoints, and one-line config errors."""

import json
import subprocess
import sys

import pytest
import torch

from curvopt.cli import load_config, main
from curvopt_tests.cli.configs import write_config as _write

SMALL = """
[model]
arch = "mlp"
train_epochs = 1
[data]
samples = 300
batch_size = 100
[estimators]
top_k = 2
trace_probes = 9
density_probes = 1
density_steps = 8
landscape_steps = 5
[output]
progress = false
plots = {plots}
"""




def test_analyze_small_run_prints_and_writes(tmp_path, capsys):
    plots = "true"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plots = "false"
    cfg = _write(tmp_path, SMALL.format(plots=plots))
    assert main(["analyze", "--config", cfg, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "top-2 eigenvalues" in out and "trace:" in out and "HAWQ score" in out
    result = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert len(result["top_eigenvalues"]) == 2
    assert result["top_eigenvalues"][0] >= result["top_eigenvalues"][1]
    assert set(result["sensitivity"]["layers"]) == {"0", "2", "4"}
    if plots == "true":
        assert (tmp_path / "out" / "spectral_density.png").exists()


def test_analyze_loads_a_checkpoint_with_weights_only(tmp_path, capsys):
    from curvopt.models import mlp

    torch.manual_seed(1)
    model = mlp((40, 128, 128, 10))
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    text = SMALL.format(plots="false") + '\n[curvature]\nbackend = "ggn"\n'
    text = text.replace('[model]\narch = "mlp"', f'[model]\narch = "mlp"\ncheckpoint = "{ckpt}"')
    cfg = _write(tmp_path, text)
    assert main(["analyze", "--config", cfg, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "loaded" in out and "curvature: ggn" in out


@pytest.mark.parametrize("text,message", [
    ("[model]\narhc = 'mlp'\n", "unknown key 'arhc' in [model]"),
    ("[modle]\n", "unknown section [modle]"),
    ("[curvature]\nbackend = 'hesian'\n", "backend = 'hesian'; valid: backpack_diag_ggn"),
    ("[model]\narch = 'resnet'\n", "arch = 'resnet'; valid: cnn1d, mlp"),
    ("[data]\nsamples = 'many'\n", "samples = 'many' should be a int"),
    ("[model]\ncheckpoint = 'missing.pt'\n", "checkpoint not found: missing.pt"),
    ("[model\n", "is not valid TOML"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    cfg = _write(tmp_path, text)
    assert main(["analyze", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_config_file(capsys):
    assert main(["analyze", "--config", "/no/such/file.toml"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_a_config_error(tmp_path, capsys):
    ckpt = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2, 2)}, ckpt)
    cfg = _write(tmp_path, f"[model]\narch = 'mlp'\ncheckpoint = '{ckpt}'\n[output]\nprogress = false\n")
    assert main(["analyze", "--config", cfg]) == 2
    assert "does not fit a mlp" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "curvopt.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "analyze" in result.stdout


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg["curvature"]["backend"] == "hessian" and cfg["model"]["arch"] == "cnn1d"
