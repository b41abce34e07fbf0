"""``curvopt train`` with a ``[schedule]``: each name trains and writes ``iterations``, ``batch_size``,
``lr`` and ``top_eigenvalue`` consistent with the schedule's history; bad values fail before the data is
built (one line, exit 2)."""

import csv
import math

import pytest

import curvopt.cli as cli
from curvopt.cli import main

CONFIG = """
[model]
arch = "mlp"
[data]
dataset = "digits"
batch_size = 64
[optimizer]
name = "{optimizer}"
lr = 0.05
[train]
epochs = {epochs}
[schedule]
{schedule}
[output]
progress = false
"""
PROBE = "probe_size = 128, lanczos_steps = 5"


def _write(tmp_path, schedule, optimizer="sgd", epochs=2):
    path = tmp_path / "cfg.toml"
    path.write_text(CONFIG.format(optimizer=optimizer, epochs=epochs, schedule=schedule))
    return str(path)


def _run(tmp_path, monkeypatch, schedule, **kwargs):
    """Train; returns the CSV rows and the schedule the command built (``None`` for ``"none"``)."""
    built = []
    make = cli._make_schedule

    def record(*args, **kw):
        built.append(make(*args, **kw))
        return built[-1]

    monkeypatch.setattr(cli, "_make_schedule", record)
    assert main(["train", "--config", _write(tmp_path, schedule, **kwargs), "--out", str(tmp_path / "run")]) == 0
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return rows, (built[-1] if built else None)  # the last one: the first is the validation's stand-in


def _check_against_history(rows, sched, lr_set_at_epoch_end=True):
    """Row ``e`` is epoch ``e``: its steps so far, the batch size and lr it trained with, and its end-of-epoch
    probe; ``sched.step()`` then set the next epoch's batch size and lr (the history's record). FB's warm-up
    sets the lr before each step instead (``lr_set_at_epoch_end=False``)."""
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    assert len(sched.history) == len(rows)
    for row, record in zip(rows, sched.history):
        assert int(row["iterations"]) == record["iterations"]
        if "eigenvalue" in record:
            assert float(row["top_eigenvalue"]) == pytest.approx(record["eigenvalue"], rel=1e-12)
        else:
            assert row["top_eigenvalue"] == ""
    for row, record in zip(rows[1:], sched.history[:-1]):
        assert int(row["batch_size"]) == record["batch_size"]
        if lr_set_at_epoch_end:
            assert float(row["lr"]) == pytest.approx(record["lr"], rel=1e-12)


def test_none_is_the_plain_loop_with_the_new_columns(tmp_path, monkeypatch):
    rows, sched = _run(tmp_path, monkeypatch, 'name = "none"')
    assert sched is None
    n = len(cli._dataset({"data": {"dataset": "digits"}}).y_train)
    steps = math.ceil(n / 64)  # the plain loader keeps the short last batch
    assert [int(r["iterations"]) for r in rows] == [steps, 2 * steps]
    assert [int(r["batch_size"]) for r in rows] == [64, 64]
    assert [float(r["lr"]) for r in rows] == [0.05, 0.05]
    assert [r["top_eigenvalue"] for r in rows] == ["", ""]


def test_fb_trains_at_the_max_batch_with_warmed_up_lr(tmp_path, monkeypatch):
    rows, sched = _run(tmp_path, monkeypatch, 'name = "fb"\nmax_batch_size = 256\noptions = { warmup_epochs = 1 }')
    _check_against_history(rows, sched, lr_set_at_epoch_end=False)
    n = len(sched.data)
    assert [int(r["iterations"]) for r in rows] == [n // 256, 2 * (n // 256)]
    assert [int(r["batch_size"]) for r in rows] == [256, 256]
    # the last warm-up step (t = T - 1) is just short of the target; after warm-up lr0 * 256 / 64
    T = n // 256
    assert float(rows[0]["lr"]) == pytest.approx(0.05 + (0.2 - 0.05) * (T - 1) / T, rel=1e-12)
    assert float(rows[1]["lr"]) == pytest.approx(0.2, rel=1e-12)


def test_gg_grows_the_batch_at_its_milestone(tmp_path, monkeypatch):
    rows, sched = _run(tmp_path, monkeypatch, 'name = "gg"\nmax_batch_size = 256\noptions = { milestones = [1] }')
    _check_against_history(rows, sched)
    n = len(sched.data)
    assert [int(r["batch_size"]) for r in rows] == [64, 128]
    assert [int(r["iterations"]) for r in rows] == [n // 64, n // 64 + n // 128]
    assert [float(r["lr"]) for r in rows] == [0.05, 0.05]  # the batch grows instead of the lr decaying


@pytest.mark.parametrize("name,extra", [("abs", ""), ("absa", ", eps = 0.1")])
def test_abs_and_absa_grow_and_report_the_probe(tmp_path, monkeypatch, name, extra):
    # duration = 1: every check grows the batch (by the eigenvalue rule or by duration)
    rows, sched = _run(tmp_path, monkeypatch, f'name = "{name}"\nmax_batch_size = 256\n'
                                              f'options = {{ duration = 1, {PROBE}{extra} }}', epochs=3)
    _check_against_history(rows, sched)
    assert [int(r["batch_size"]) for r in rows] == [64, 128, 256]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 0.1, 0.2], rel=1e-12)  # linear scaling
    eigs = [float(r["top_eigenvalue"]) for r in rows]
    assert all(math.isfinite(e) and e > 0 for e in eigs)
    assert sched.epochs == 3 and sched.seed == 0  # from [train] epochs and [model] seed
    assert (sched.adversarial is not None) == (name == "absa")


def test_mid_epoch_checks_report_the_epochs_last_probe(tmp_path, monkeypatch):
    rows, sched = _run(tmp_path, monkeypatch, f'name = "abs"\nmax_batch_size = 128\n'
                                              f'options = {{ check_every = 7, {PROBE} }}', epochs=1)
    assert len(sched.history) > 1  # several checks in the epoch, none at its end
    assert float(rows[0]["top_eigenvalue"]) == sched.history[-1]["eigenvalue"]
    assert int(rows[0]["iterations"]) == sched.iterations


@pytest.fixture
def no_computation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data was built before the config was validated")

    monkeypatch.setattr(cli, "_dataset", refuse)


@pytest.mark.parametrize("schedule,optimizer,message", [
    ('name = "adaptive"', "sgd", "[schedule] name = 'adaptive'; valid: none, fb, gg, abs, absa"),
    ('name = "abs"\nbatch_size = 128\nmax_batch_size = 64', "sgd",
     "[schedule] max_batch_size = 64 is below batch_size = 128"),
    ('name = "abs"\nmax_batch_size = 32', "sgd", "max_batch_size = 32 is below batch_size = 64"),  # [data]'s
    ('name = "abs"', "sgd", "name = 'abs' needs max_batch_size"),
    ('name = "none"\nmax_batch_size = 256', "sgd", "max_batch_size = 256 with name = 'none'"),
    ('name = "none"\noptions = { duration = 2 }', "sgd", "name = 'none' takes no options"),
    ('name = "abs"\nmax_batch_size = 256\noptions = { kapa = 3.0 }', "sgd", "unknown key(s) 'kapa'; valid: "),
    ('name = "abs"\nmax_batch_size = 256\noptions = { eps = 0.1 }', "sgd", "unknown key(s) 'eps'"),
    ('name = "fb"\nmax_batch_size = 256\noptions = { epochs = 3 }', "sgd", "options may not set epochs"),
    ('name = "gg"\nmax_batch_size = 256', "sgd", "name = 'gg' needs options = { milestones"),
    ('name = "absa"\nmax_batch_size = 256', "sgd", "name = 'absa' needs options = { eps"),
    ('name = "abs"\nbatch_size = -8\nmax_batch_size = 256', "sgd", "[schedule] batch_size = -8"),
    ('name = "abs"\nmax_batch_size = -256', "sgd", "[schedule] max_batch_size = -256"),
    ('name = "abs"\nmax_batch_size = 256\noptions = { kappa = -2.0 }', "sgd", "[schedule] abs: kappa must be"),
    ('name = "abs"\nmax_batch_size = 256\noptions = { duration = -1 }', "sgd", "[schedule] abs: duration must"),
    ('name = "absa"\nmax_batch_size = 256\noptions = { eps = -0.1 }', "sgd", "[schedule] absa: FGSM eps must"),
    ('name = "absa"\nmax_batch_size = 256\noptions = { eps = 0.1, fraction = 1.5 }', "sgd", "fraction must be"),
    ('name = "gg"\nmax_batch_size = 256\noptions = { milestones = [-1] }', "sgd", "[schedule] gg: milestones"),
    ('name = "fb"\nmax_batch_size = 256\noptions = { warmup_epochs = -1 }', "sgd", "warmup_epochs must be"),
    ('name = "abs"\nmax_batch_size = 256\noptions = { lr_scaling = "cubic" }', "sgd", "lr_scaling='cubic'"),
    ('name = "abs"\nmax_batch_size = 256\noptions = { curvature = "hessain" }', "sgd", "[schedule] abs: "),
    ('name = "abs"\nmax_batch_size = 256\noptions = { curvature_options = { cahce = true } }', "sgd", "cahce"),
    ('name = "abs"\nmax_batch_size = 256', "newton_mr", "needs a gradient optimizer"),
])
def test_bad_schedule_fails_before_the_data_is_built(tmp_path, capsys, no_computation, schedule, optimizer,
                                                      message):
    assert main(["train", "--config", _write(tmp_path, schedule, optimizer=optimizer)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("curvopt: error: ")
    assert not (tmp_path / "runs").exists()


def test_max_batch_beyond_the_dataset_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "--config", _write(tmp_path, 'name = "abs"\nmax_batch_size = 100000'),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "fewer than a batch" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_kfac_under_abs(tmp_path, monkeypatch):
    rows, sched = _run(tmp_path, monkeypatch, f'name = "abs"\nmax_batch_size = 256\n'
                                              f'options = {{ duration = 1, micro_batch_size = 32, {PROBE} }}',
                       optimizer="kfac")
    _check_against_history(rows, sched)
    assert [int(r["batch_size"]) for r in rows] == [64, 128]
    assert float(rows[-1]["test_acc"]) > 0.5  # digits: far above chance (0.1)


def test_blockwise_writes_each_blocks_eigenvalue(tmp_path, monkeypatch):
    rows, sched = _run(tmp_path, monkeypatch, f'name = "abs"\nmax_batch_size = 128\n'
                                              f'options = {{ blockwise = true, {PROBE} }}', epochs=1)
    values = [float(v) for v in rows[0]["top_eigenvalue"].split(";")]
    assert values == sched.history[-1]["eigenvalue"] and len(values) == 3  # the mlp's three Linear layers
