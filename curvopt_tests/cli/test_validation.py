"""CLI: every config value and the checkpoint are checked before any computation (one line, exit 2);
reports and plots name the backend used; ``arch = "transformer"``."""

import json

import pytest
import torch
from torch import nn

import curvopt.cli as cli
from curvopt.cli import main
from curvopt_tests.cli.configs import write_config as _write


@pytest.fixture
def no_computation(monkeypatch):
    """Building the dataset or training counts as computation: a config error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("computation started before the config was validated")

    monkeypatch.setattr(cli, "_dataset", refuse)
    monkeypatch.setattr(cli, "_train", refuse)


def _one_line_error(capsys, message):
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("curvopt: error: ")


@pytest.mark.parametrize("text,message", [
    ("[estimators]\ntop_k = 0\n", "[estimators] top_k = 0"),
    ("[estimators]\ntop_k = -3\n", "[estimators] top_k = -3"),
    ("[estimators]\ntrace_probes = 0\n", "[estimators] trace_probes = 0"),
    ("[estimators]\ntrace_probes = 2.5\n", "trace_probes = 2.5 should be a int"),
    ("[estimators]\ndensity_probes = -1\n", "[estimators] density_probes = -1"),
    ("[estimators]\ndensity_steps = 0\n", "[estimators] density_steps = 0"),
    ("[estimators]\ntol = 0\n", "[estimators] tol = 0.0"),
    ("[estimators]\ntol = -1e-3\n", "[estimators] tol = -0.001"),
    ("[estimators]\ntol = nan\n", "[estimators] tol = nan"),
    ("[estimators]\ntrace_method = 'hutch'\n", "trace_method = 'hutch'; valid: hutchinson, hutchpp"),
    ("[estimators]\nsensitivity_bits = 1\n", "[estimators] sensitivity_bits = 1"),
    ("[estimators]\nlandscape_steps = 1\n", "[estimators] landscape_steps = 1"),
    ("[estimators]\nlandscape_steps = 0\n", "[estimators] landscape_steps = 0"),
    ("[estimators]\nlandscape_radius = 0\n", "[estimators] landscape_radius = 0.0"),
    ("[estimators]\nlandscape_radius = inf\n", "[estimators] landscape_radius = inf"),
    ("[data]\nbatch_size = 0\n", "[data] batch_size = 0"),
    ("[data]\nbatch_size = -5\n", "[data] batch_size = -5"),
    ("[data]\nsamples = 0\n", "[data] samples = 0"),
    ("[model]\ntrain_epochs = -1\n", "[model] train_epochs = -1"),
    ("[model]\nlr = 0\n", "[model] lr = 0.0"),
    ("[curvature]\noptions = { progress = true }\n", "may not set progress"),
])
def test_bad_analyze_values_fail_before_any_computation(tmp_path, capsys, no_computation, text, message):
    assert main(["analyze", "--config", _write(tmp_path, text)]) == 2
    _one_line_error(capsys, message)


@pytest.mark.parametrize("text,message", [
    ("[data]\nbatch_size = 0\n", "[data] batch_size = 0"),
    ("[train]\nepochs = 0\n", "[train] epochs = 0"),
    ("[train]\nepochs = -2\n", "[train] epochs = -2"),
    ("[optimizer]\nlr = -0.1\n", "[optimizer] lr = -0.1"),
])
def test_bad_train_values_fail_before_any_computation(tmp_path, capsys, no_computation, text, message):
    assert main(["train", "--config", _write(tmp_path, text)]) == 2
    _one_line_error(capsys, message)


def _checkpoints(tmp_path):
    from curvopt.models import cnn1d, mlp

    torch.save(mlp((64, 128, 128, 10)), tmp_path / "module.pt")  # the whole pickled module
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    opt = torch.optim.SGD(mlp((40, 8, 10)).parameters(), lr=0.1)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save(cnn1d(64, classes=10).state_dict(), tmp_path / "cnn.pt")
    return {
        "module.pt": "cannot be read as a state dict",
        "tensor.pt": "holds a Tensor, not a model's state dict",
        "optimizer.pt": "not a model's state dict",
        "garbage.pt": "cannot be read as a state dict",
        "cnn.pt": "does not fit a mlp",
    }


def test_checkpoint_of_the_wrong_kind_fails_at_load_time(tmp_path, capsys, monkeypatch):
    cases = _checkpoints(tmp_path)
    computed = []
    monkeypatch.setattr(cli, "_train", lambda *a, **k: computed.append("train"))
    import curvopt

    monkeypatch.setattr(curvopt, "top_eigenvalues", lambda *a, **k: computed.append("analysis"))
    for name, message in cases.items():
        ckpt = tmp_path / name
        cfg = _write(tmp_path, f"[model]\narch = 'mlp'\ncheckpoint = '{ckpt}'\n[data]\ndataset = 'digits'\n")
        assert main(["analyze", "--config", cfg]) == 2, name
        _one_line_error(capsys, message)
    assert computed == []


def test_checkpoint_is_read_before_the_data_is_built(tmp_path, capsys, no_computation):
    cases = _checkpoints(tmp_path)
    for name in ("module.pt", "tensor.pt", "garbage.pt"):
        cfg = _write(tmp_path, f"[model]\narch = 'mlp'\ncheckpoint = '{tmp_path / name}'\n")
        assert main(["analyze", "--config", cfg]) == 2
        _one_line_error(capsys, cases[name])


def test_unknown_backend_option_and_oversized_top_k_fail_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_train", lambda *a, **k: pytest.fail("trained before validating"))
    cfg = _write(tmp_path, "[model]\narch = 'mlp'\n[data]\ndataset = 'digits'\n"
                           "[curvature]\nbackend = 'ggn'\noptions = { mc_sample = 3 }\n")
    assert main(["analyze", "--config", cfg]) == 2
    _one_line_error(capsys, "unknown option(s) 'mc_sample'")
    cfg = _write(tmp_path, "[model]\narch = 'mlp'\n[data]\ndataset = 'digits'\n[estimators]\ntop_k = 100000\n")
    assert main(["analyze", "--config", cfg]) == 2
    _one_line_error(capsys, "top_k = 100000 exceeds the")


SMALL = """
[model]
arch = "{arch}"
train_epochs = 0
[data]
dataset = "digits"
samples = 64
batch_size = 32
[curvature]
backend = "{backend}"
[estimators]
top_k = 2
trace_probes = 3
density_probes = 1
density_steps = 4
landscape_steps = 2
[output]
progress = false
plots = true
"""


def test_report_and_plot_titles_name_the_backend(tmp_path, capsys, monkeypatch):
    from curvopt.analysis import plots

    titles = []

    def record(*args, title, **kwargs):
        titles.append(title)
        return args[-1]

    monkeypatch.setattr(plots, "plot_spectral_density", record)
    monkeypatch.setattr(plots, "plot_landscape", record)
    cfg = _write(tmp_path, SMALL.format(arch="mlp", backend="ggn"))
    assert main(["analyze", "--config", cfg, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert len(titles) == 3 and all("ggn" in t and "Hessian" not in t for t in titles), titles
    assert "top-2 eigenvalues of the ggn" in out and "ggn trace:" in out and "ggn sensitivity" in out
    assert json.loads((tmp_path / "out" / "analysis.json").read_text())["backend"] == "ggn"


def test_transformer_arch_trains_and_analyzes(tmp_path, capsys):
    from curvopt.models import transformer

    train_cfg = _write(tmp_path, "[model]\narch = 'transformer'\n[data]\ndataset = 'digits'\nbatch_size = 256\n"
                                 "[optimizer]\nname = 'adam'\n[train]\nepochs = 1\n[output]\nprogress = false\n",
                       "train.toml")
    assert main(["train", "--config", train_cfg, "--out", str(tmp_path / "run")]) == 0
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    reference = transformer(64, 10)
    assert set(state) == set(reference.state_dict())
    text = SMALL.format(arch="transformer", backend="hessian").replace("plots = true", "plots = false")
    text = text.replace("train_epochs = 0", f"checkpoint = '{tmp_path / 'run' / 'model.pt'}'")
    text = text.replace("samples = 64", "samples = 32").replace("top_k = 2", "top_k = 1")
    assert main(["analyze", "--config", _write(tmp_path, text), "--out", str(tmp_path / "a")]) == 0
    result = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert "encoder.layers.0.self_attn.out_proj" in result["sensitivity"]["ranking"]
    assert all(isinstance(v, float) for v in result["top_eigenvalues"])


def test_lstm_arch_is_built():
    config = cli.load_config(None)
    config["model"]["arch"] = "lstm"
    model = cli._model(config, 40, 10)
    assert any(isinstance(m, nn.LSTM) for m in model.modules())
    assert model(torch.randn(3, 40)).shape == (3, 10)


@pytest.mark.parametrize("text,message", [
    ("[allocaton]\n", "unknown section [allocaton]"),
    ("[allocation]\nbudget = 3\n", "unknown key 'budget' in [allocation]"),
    ("[sensitivity]\nscore = 'hawq_v3'\n", "score = 'hawq_v3'; valid: hawq_v2, hawq_v1, qbert, fisher, gptq"),
    ("[sensitivity]\ncurvature = 'hesian'\n", "[sensitivity] curvature = 'hesian'; valid:"),
    ("[sensitivity]\nscore = 'fisher'\ncurvature = 'hessian'\n", "score = 'fisher' needs curvature = one of"),
    ("[sensitivity]\nprobes = 0\n", "[sensitivity] probes = 0"),
    ("[sensitivity]\nsamples = 0\n", "[sensitivity] samples = 0"),
    ("[sensitivity]\noptions = { probes = 3 }\n", "[sensitivity] options in"),
    ("[quantizer]\nname = 'nf4'\n", "[quantizer] name = 'nf4'; valid: symmetric, asymmetric"),
    ("[quantizer]\noptions = { clip = 'mse' }\n", "unknown option 'clip'"),
    ("[quantizer]\noptions = { clipping = 'max' }\n", "[quantizer] symmetric with options"),
    ("[quantizer]\nactivation_bits = 1\n", "[quantizer] activation_bits = 1"),
    ("[allocation]\nmethod = 'greedy'\n", "[allocation] method = 'greedy'; valid: ilp, pareto"),
    ("[allocation]\nbits = [1, 4]\n", "[allocation] bits = [1, 4]"),
    ("[allocation]\nbits = [4, 9]\n", "[allocation] bits = [4, 9]"),
    ("[allocation]\nbits = []\n", "[allocation] bits = []"),
    ("[allocation]\nbits = [4, 4]\n", "lists a width twice"),
    ("[allocation]\nbits = ['4']\n", "[allocation] bits = ['4']"),
    ("[allocation]\naverage_bits = [1.5]\n", "average_bits = 1.5 in"),
    ("[allocation]\nbits = [3, 4]\naverage_bits = [3.5, 2.5]\n", "min(bits) = 3 bits"),
    ("[allocation]\naverage_bits = [3.0]\nsize_bytes = [1000]\n", "both average_bits and size_bytes"),
    ("[allocation]\nsize_bytes = [-1]\n", "[allocation] size_bytes = [-1]"),
    ("[allocation]\naverage_bits = nan\n", "[allocation] average_bits = [nan]"),
    ("[allocation]\naverage_bits = 'three'\n", "average_bits = 'three' should be a list"),
    ("[allocation]\nfixed = { first = 1 }\n", "[allocation] fixed = { first = 1 }"),
    ("[allocation]\nrandom = -1\n", "[allocation] random = -1"),
    ("[finetune]\nepochs = -1\n", "[finetune] epochs = -1"),
    ("[finetune]\nlr = 0\n", "[finetune] lr = 0.0"),
    ("[model]\narch = 'resnet'\n", "arch = 'resnet'; valid: cnn1d, mlp"),
    ("[model]\nhidden = [0]\n", "[model] hidden = [0]"),
    ("[model]\nconv_layers = 0\n", "[model] conv_layers = 0"),
])
def test_bad_quantize_values_fail_before_any_computation(tmp_path, capsys, no_computation, text, message):
    assert main(["quantize", "--config", _write(tmp_path, text)]) == 2
    _one_line_error(capsys, message)


@pytest.fixture
def no_analysis(monkeypatch):
    """Building the data and the model is allowed (the checks against the model's sizes need it); training,
    sensitivity and allocation are not."""
    import curvopt
    import curvopt.quant.allocate as allocate

    def refuse(*args, **kwargs):
        raise AssertionError("computation started before the config was validated")

    monkeypatch.setattr(cli, "_train", refuse)
    monkeypatch.setattr(curvopt, "sensitivity", refuse)
    real = allocate.allocate_bits

    def zero_scores_only(model, scores, **kwargs):  # the budget check's dry run, on all-zero scores
        assert all(v == 0 for row in scores.values() for v in row.values()), "allocated on real scores"
        return real(model, scores, **kwargs)

    monkeypatch.setattr(allocate, "allocate_bits", zero_scores_only)


@pytest.mark.parametrize("text,message", [
    ("[allocation]\nfixed = { '9' = 8 }\n", "fixed names '9', not a quantizable module of the mlp; quantizable "
                                            "modules: 0, 2, 4 (or first, last)"),
    ("[allocation]\nfixed = { first = 8, '0' = 4 }\n", "fixed sets module '0' to both 8 and 4 bits"),
    ("[allocation]\nsize_bytes = [100]\n", "budget 100 B: size_bytes=100 is below the smallest allocation: at "
                                           "least 360 bytes"),
    ("[allocation]\naverage_bits = [2.0]\nfixed = { first = 8, last = 8 }\n",
     "budget 2-bit avg: average_bits=2.0 is below the smallest allocation"),
    ("[sensitivity]\ncurvature = 'ggn'\noptions = { mc_sample = 3 }\n", "unknown option(s) 'mc_sample'"),
])
def test_quantize_checks_against_the_model_come_before_training(tmp_path, capsys, no_analysis, text, message):
    head = "[model]\narch = 'mlp'\nhidden = [16, 16]\n[data]\ndataset = 'digits'\n[output]\nprogress = false\n"
    assert main(["quantize", "--config", _write(tmp_path, head + text)]) == 2
    _one_line_error(capsys, message)


def test_quantize_reads_the_checkpoint_before_the_data(tmp_path, capsys, no_computation):
    cases = _checkpoints(tmp_path)
    for name in ("module.pt", "tensor.pt", "garbage.pt"):
        cfg = _write(tmp_path, f"[model]\narch = 'mlp'\ncheckpoint = '{tmp_path / name}'\n")
        assert main(["quantize", "--config", cfg]) == 2
        _one_line_error(capsys, cases[name])
