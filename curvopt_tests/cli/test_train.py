"""``curvopt train``: optimizer chosen by name, per-epoch CSV, weights, one-line errors."""

import csv

import pytest
import torch

from curvopt.cli import main

CONFIG = """
[model]
arch = "mlp"
[data]
dataset = "digits"
batch_size = 128
[optimizer]
name = "{name}"
lr = {lr}
options = {options}
[train]
epochs = 2
[output]
progress = false
"""


@pytest.mark.parametrize("name,lr,options", [("kfac", 0.05, "{ damping = 0.01 }"), ("adam", 0.003, "{}"),
                                             ("sgd", 0.1, "{ momentum = 0.9 }")])
def test_train_writes_metrics_and_weights(tmp_path, capsys, name, lr, options):
    cfg = tmp_path / "train.toml"
    cfg.write_text(CONFIG.format(name=name, lr=lr, options=options))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["test_acc"]) > 0.5  # digits is easy: every optimizer passes chance (0.1) by far
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert "0.weight" in state
    assert f"with {name}" in capsys.readouterr().out


def test_trained_weights_feed_analyze(tmp_path, capsys):
    cfg = tmp_path / "train.toml"
    cfg.write_text(CONFIG.format(name="kfac", lr=0.05, options="{}"))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    analyze_cfg = tmp_path / "analyze.toml"
    analyze_cfg.write_text(f"""
[model]
arch = "mlp"
checkpoint = "{tmp_path / 'run' / 'model.pt'}"
[data]
dataset = "digits"
samples = 200
batch_size = 100
[estimators]
top_k = 1
trace_probes = 6
[output]
plots = false
progress = false
""")
    assert main(["analyze", "--config", str(analyze_cfg), "--out", str(tmp_path / "an")]) == 0
    assert "loaded" in capsys.readouterr().out


@pytest.mark.parametrize("text,message", [
    ("[optimizer]\nname = 'lbfgs'\n", "name = 'lbfgs'; valid: kfac, adam, sgd"),
    ("[optimizer]\noptions = { dampnig = 0.1 }\n", "unknown key(s) 'dampnig'; valid: damping"),
    ("[optimizer]\nlr = -1.0\n", "[optimizer] lr = -1.0"),  # checked when the config is loaded
    ("[train]\nepochz = 3\n", "unknown key 'epochz' in [train]"),
])
def test_bad_train_config(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


NEWTON_OPTIONS = [
    ("newton_mr", '{ curvature = "ggn", curvature_fraction = 0.25, damping = 0.01, max_iter = 10 }'),
    ("trust_region", '{ curvature = "ggn", radius = 0.5, max_iter = 10 }'),
    ("arc", '{ curvature = "hessian", curvature_fraction = 0.5, max_iter = 10 }'),
]


@pytest.mark.parametrize("name,options", NEWTON_OPTIONS)
def test_train_with_newton_type_optimizers(tmp_path, capsys, name, options):
    cfg = tmp_path / "train.toml"
    cfg.write_text(CONFIG.format(name=name, lr=0, options=options).replace("epochs = 2", "epochs = 1"))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert float(rows[-1]["test_acc"]) > 0.5
    assert f"with {name}" in capsys.readouterr().out


def test_unknown_newton_option_is_a_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "train.toml"
    cfg.write_text(CONFIG.format(name="trust_region", lr=1.0, options='{ curvature = "gnn" }'))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ggn" in err


@pytest.mark.parametrize("name", ["newton_mr", "trust_region", "arc"])
def test_newton_type_optimizers_train_with_default_options(tmp_path, name):
    # nothing set but the name (and digits, to keep it short): the command's cnn1d at batch 128 and the
    # optimizer's defaults; with the Hessian (the classes' default) all three raised the loss on mnist1d
    import math

    from torch import nn

    from curvopt.cli import _dataset, _model

    cfg = tmp_path / "train.toml"
    cfg.write_text(f'[optimizer]\nname = "{name}"\n[data]\ndataset = "digits"\n[train]\nepochs = 2\n'
                   '[output]\nprogress = false\n')
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows]
    data = _dataset({"data": {"dataset": "digits"}})
    model = _model({"model": {"arch": "cnn1d", "seed": 0}}, data.X_train.shape[1], data.num_classes)
    with torch.no_grad():
        initial = float(nn.functional.cross_entropy(model(data.X_train), data.y_train))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * initial, f"train loss {initial:.3f} -> {losses}"
