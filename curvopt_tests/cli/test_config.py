"""Typed configs: one dataclass per TOML table, 1:1 with the file, and every option name checked against the
registry before any computation."""

import dataclasses
import json

import pytest

import curvopt.cli as cli
from curvopt.cli import main
from curvopt.cli.config import AnalyzeConfig, QuantizeConfig, Table, TrainConfig, load_config
from curvopt_tests.cli.configs import write_config as _write


def _toml(config) -> str:
    """``config`` written as TOML (JSON scalars and arrays are TOML; dicts become inline tables)."""

    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    return "\n".join(f"[{section}]\n" + "\n".join(f"{k} = {value(v)}" for k, v in table.items())
                     for section, table in config.to_dict().items()) + "\n"


@pytest.mark.parametrize("cls", [AnalyzeConfig, TrainConfig, QuantizeConfig])
def test_every_table_and_key_maps_onto_the_dataclasses(tmp_path, cls):
    defaults = cls()
    assert all(isinstance(defaults[s], Table) and dataclasses.is_dataclass(defaults[s]) for s in defaults)
    loaded = load_config(_write(tmp_path, _toml(defaults)), cls)
    assert loaded == defaults and type(loaded) is cls
    assert loaded.output.progress is True and loaded["output"]["progress"] is True  # attribute = item
    # lists and dicts are per config, not shared between instances
    assert cls().model is not defaults.model


def test_values_are_typed_and_read_back(tmp_path):
    config = load_config(_write(tmp_path, "[optimizer]\nname = 'adam'\nlr = 1\n[train]\nepochs = 3\n"
                                          "[schedule]\nname = 'gg'\nmax_batch_size = 256\n"
                                          "options = { milestones = [1] }\n"), TrainConfig)
    assert config.optimizer.name == "adam" and isinstance(config.optimizer.lr, float) and config.optimizer.lr == 1
    assert config.train.epochs == 3 and config.schedule.options == {"milestones": [1]}
    assert config.to_dict()["schedule"] == {"name": "gg", "batch_size": 0, "max_batch_size": 256,
                                            "options": {"milestones": [1]}}


@pytest.fixture
def no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data was built before the config was validated")

    monkeypatch.setattr(cli, "_dataset", refuse)
    monkeypatch.setattr(cli, "_train", refuse)


# before: each of these was found only after the data was built (by the optimizer or the curvature's
# constructor), so a typo in a long run's config cost the dataset build (and, for analyze, nothing less)
@pytest.mark.parametrize("command,text,message", [
    ("train", "[optimizer]\noptions = { dampnig = 0.1 }\n",
     "[optimizer] options for 'kfac' has unknown key(s) 'dampnig'; valid: damping"),
    ("train", "[optimizer]\nname = 'adam'\noptions = { momentum = 0.9 }\n",
     "[optimizer] options for 'adam' has unknown key(s) 'momentum'; valid: betas"),
    ("analyze", "[curvature]\nbackend = 'ggn'\noptions = { mc_sample = 3 }\n",
     "[curvature] options: the 'ggn' curvature got unknown option(s) 'mc_sample'; valid options:"),
    ("quantize", "[sensitivity]\ncurvature = 'fisher'\noptions = { mc_sample = 3 }\n",
     "[sensitivity] options: the 'fisher' curvature got unknown option(s) 'mc_sample'; valid options:"),
])
def test_option_names_are_checked_before_the_data_is_built(tmp_path, capsys, no_data, command, text, message):
    assert main([command, "--config", _write(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("curvopt: error: ")


def test_block_diagonal_options_are_checked_by_its_base(tmp_path, capsys, no_data):
    # block_diagonal forwards its options to the base it builds: they are not refused as its own
    text = "[curvature]\nbackend = 'block_diagonal'\noptions = { base = 'fisher', mc_samples = 2 }\n"
    assert isinstance(load_config(_write(tmp_path, text)), AnalyzeConfig)


def test_every_name_a_config_chooses_is_read_from_its_registry():
    from curvopt.curvature.registry import CURVATURES
    from curvopt.optim.registry import OPTIMIZERS
    from curvopt.quant import ALLOCATORS, SCORES
    from curvopt.quant.quantizer import QUANTIZERS
    from curvopt.schedule.registry import SCHEDULES

    def choices(config, section, name):
        f = {f.name: f for f in dataclasses.fields(config[section])}[name]
        valid = f.metadata["choices"]
        return list(valid() if callable(valid) else valid)

    assert choices(AnalyzeConfig(), "curvature", "backend") == CURVATURES.names()
    assert choices(TrainConfig(), "optimizer", "name") == OPTIMIZERS.names()
    assert choices(TrainConfig(), "schedule", "name") == SCHEDULES.names()
    quantize = QuantizeConfig()
    assert choices(quantize, "sensitivity", "score") == SCORES.names()
    assert choices(quantize, "quantizer", "name") == QUANTIZERS.names()
    assert choices(quantize, "allocation", "method") == ALLOCATORS.names() == ["ilp", "pareto"]
    assert list(cli.ALLOCATION_METHODS) == ALLOCATORS.names()
    # a score's own curvature and the ones it accepts come from its entry
    quantize.sensitivity.score = "fisher"
    assert cli.config.sensitivity_curvature(quantize) == SCORES.get("fisher").default_curvature == "fisher"
