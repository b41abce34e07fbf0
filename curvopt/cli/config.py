"""The command line's configs: one small dataclass per TOML table, validated before any work.

Each command reads a TOML file whose tables (``[model]``, ``[data]``, ``[optimizer]``...) map one to one onto
the fields of :class:`AnalyzeConfig`, :class:`TrainConfig` or :class:`QuantizeConfig`; every key is optional
and defaults to the dataclass's value. :func:`load_config` rejects unknown tables and keys, wrong types,
numbers out of range and names that are not registered (curvatures, optimizers, schedules, scores,
quantizers) with a :class:`~curvopt.errors.ConfigError` naming ``[table] key`` and the valid choices, before
the data is built (exit status 2). Tables also read like the dicts they map from (``config["model"]["arch"]``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import tomllib
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from curvopt.errors import ConfigError, CurvoptError

#: The budget when ``[allocation]`` gives neither ``average_bits`` nor ``size_bytes``.
DEFAULT_AVERAGE_BITS = 3.0
#: ``[allocation] fixed`` names that stand for the first and the last quantizable module.
FIXED_ALIASES = ("first", "last")
ARCHS = ("cnn1d", "mlp", "transformer", "lstm")
DATASETS = ("mnist1d", "digits")
LOSSES = {"cross_entropy": nn.CrossEntropyLoss}
#: ``[schedule] options`` the command sets itself.
SCHEDULE_RESERVED = ("epochs",)


def _curvatures() -> tuple[str, ...]:
    from curvopt.curvature import available_curvatures

    return tuple(available_curvatures())


def _optimizers() -> tuple[str, ...]:
    from curvopt.optim.registry import available_optimizers

    return tuple(available_optimizers())


def _schedules() -> tuple[str, ...]:
    from curvopt.schedule.registry import available_schedules

    return available_schedules()


def _trace_methods() -> tuple[str, ...]:
    from curvopt.linalg.trace import METHODS

    return tuple(METHODS)


def _scores() -> tuple[str, ...]:
    from curvopt.quant.scores import SCORE_NAMES

    return tuple(SCORE_NAMES)


def _allocation_methods() -> tuple[str, ...]:
    from curvopt.quant.allocate import ALLOCATORS

    return tuple(ALLOCATORS.names())


def _quantizers() -> tuple[str, ...]:
    from curvopt.quant.quantizer import QUANTIZER_NAMES

    return tuple(QUANTIZER_NAMES)


def key(default: Any, *, low: float | None = None, inclusive: bool = True,
        choices: Callable[[], tuple[str, ...]] | tuple[str, ...] | None = None) -> Any:
    """A TOML key: its default, and what :func:`load_config` checks.

    Args:
        default: The value when the file does not set it (lists and dicts are copied per config).
        low: The lowest valid number (``inclusive``: allowed); every number must also be finite.
        choices: The valid names, or a function returning them (a registry's names, read when checked).
    """
    meta = {"low": low, "inclusive": inclusive, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class Table:
    """Base of the config dataclasses: item access by key, as the dicts they replace."""

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, name: str) -> Any:
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def __setitem__(self, name: str, value: Any) -> None:
        if name not in self.keys():
            raise KeyError(name)
        setattr(self, name, value)

    def __contains__(self, name: object) -> bool:
        return name in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name) if name in self.keys() else default

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (TOML/JSON types), as the file would hold it."""
        return dataclasses.asdict(self)


# ---- tables -------------------------------------------------------------------------------------------------


@dataclass
class ModelTable(Table):
    """``[model]`` of ``train``: the architecture and the seed of its initialisation (and of the data order)."""

    arch: str = key("cnn1d", choices=ARCHS)
    seed: int = key(0, low=0)


@dataclass
class AnalyzeModelTable(Table):
    """``[model]`` of ``analyze``: a checkpoint, or ``train_epochs`` of Adam at ``lr`` on the embedded data."""

    arch: str = key("cnn1d", choices=ARCHS)
    checkpoint: str = key("")
    train_epochs: int = key(10, low=0)
    lr: float = key(3e-3, low=0, inclusive=False)
    seed: int = key(0, low=0)


@dataclass
class QuantizeModelTable(Table):
    """``[model]`` of ``quantize``: a CNN with 4 convolutions (5 quantizable layers, about 80% test accuracy on
    mnist1d) that trains, is analysed and is quantized in well under a minute on two CPU cores."""

    arch: str = key("cnn1d", choices=ARCHS)
    conv_layers: int = key(4, low=1)
    hidden: list[int] = key([128, 128, 128, 128])
    checkpoint: str = key("")
    train_epochs: int = key(8, low=0)
    lr: float = key(3e-3, low=0, inclusive=False)
    seed: int = key(0, low=0)


@dataclass
class DataTable(Table):
    """``[data]`` of ``train``: the embedded dataset and the (per-process) batch size."""

    dataset: str = key("mnist1d", choices=DATASETS)
    batch_size: int = key(128, low=1)


@dataclass
class AnalyzeDataTable(Table):
    """``[data]`` of ``analyze``: the first ``samples`` of the training split, in batches of ``batch_size``."""

    dataset: str = key("mnist1d", choices=DATASETS)
    samples: int = key(2000, low=1)
    batch_size: int = key(500, low=1)


@dataclass
class QuantizeDataTable(Table):
    """``[data]`` of ``quantize``: the dataset and the batches of the calibration passes."""

    dataset: str = key("mnist1d", choices=DATASETS)
    batch_size: int = key(500, low=1)


@dataclass
class LossTable(Table):
    """``[loss]``."""

    name: str = key("cross_entropy", choices=tuple(LOSSES))


@dataclass
class CurvatureTable(Table):
    """``[curvature]``: a registry backend and its keyword options."""

    backend: str = key("hessian", choices=_curvatures)
    options: dict[str, Any] = key({})


@dataclass
class EstimatorsTable(Table):
    """``[estimators]`` of ``analyze``."""

    top_k: int = key(5, low=1)
    tol: float = key(1e-3, low=0, inclusive=False)
    trace_probes: int = key(60, low=1)
    trace_method: str = key("hutchpp", choices=_trace_methods)
    density_probes: int = key(2, low=1)
    density_steps: int = key(40, low=2)
    sensitivity_bits: int = key(4, low=2)
    landscape_steps: int = key(21, low=2)  # one point is no landscape: refused
    landscape_radius: float = key(1.0, low=0, inclusive=False)
    seed: int = key(0, low=0)


@dataclass
class OutputTable(Table):
    """``[output]`` of ``train``."""

    dir: str = key("runs/train")
    progress: bool = key(True)


@dataclass
class AnalyzeOutputTable(Table):
    """``[output]`` of ``analyze``."""

    dir: str = key("runs/analyze")
    plots: bool = key(True)
    progress: bool = key(True)


@dataclass
class QuantizeOutputTable(Table):
    """``[output]`` of ``quantize``."""

    dir: str = key("runs/quantize")
    plots: bool = key(True)
    progress: bool = key(True)


@dataclass
class OptimizerTable(Table):
    """``[optimizer]``: a registry optimizer, its lr (0: the optimizer's default) and its keyword options."""

    name: str = key("kfac", choices=_optimizers)
    lr: float = key(0.0, low=0)
    options: dict[str, Any] = key({})


@dataclass
class TrainTable(Table):
    """``[train]``."""

    epochs: int = key(10, low=1)


@dataclass
class ScheduleTable(Table):
    """``[schedule]``: a batch-size schedule by name; ``batch_size = 0`` means ``[data] batch_size`` and
    ``max_batch_size = 0`` "not given" (required by fb, gg, abs, absa)."""

    name: str = key("none", choices=_schedules)
    batch_size: int = key(0, low=0)
    max_batch_size: int = key(0, low=0)
    options: dict[str, Any] = key({})


@dataclass
class SensitivityTable(Table):
    """``[sensitivity]`` of ``quantize``: a score, its curvature (``""``: the score's own) and the trace."""

    curvature: str = key("")
    score: str = key("hawq_v2", choices=_scores)
    probes: int = key(32, low=1)
    method: str = key("hutchpp", choices=_trace_methods)
    samples: int = key(500, low=1)
    seed: int = key(0, low=0)
    options: dict[str, Any] = key({})


@dataclass
class QuantizerTable(Table):
    """``[quantizer]``: a registry quantizer, activation bits (0: weights only) and its options."""

    name: str = key("symmetric", choices=_quantizers)
    activation_bits: int = key(0, low=0)
    options: dict[str, Any] = key({})


@dataclass
class AllocationTable(Table):
    """``[allocation]``: candidate widths, budgets (average bits or bytes), method, fixed layers, random plans."""

    bits: list[int] = key([2, 3, 4, 8])
    average_bits: list[float] = key([])
    size_bytes: list[float] = key([])
    method: str = key("ilp", choices=_allocation_methods)
    fixed: dict[str, Any] = key({})
    random: int = key(20, low=0)


@dataclass
class FinetuneTable(Table):
    """``[finetune]``: straight-through QAT per plan (``epochs = 0``: none)."""

    epochs: int = key(0, low=0)
    lr: float = key(1e-3, low=0, inclusive=False)
    batch_size: int = key(128, low=1)


# ---- configs ------------------------------------------------------------------------------------------------


class Config(Table):
    """Base of a command's config: its fields are the tables."""

    def check(self, path: str) -> None:
        """The checks beyond one key's type, range and choices (none by default)."""


@dataclass
class AnalyzeConfig(Config):
    """``curvopt analyze``."""

    model: AnalyzeModelTable = field(default_factory=AnalyzeModelTable)
    data: AnalyzeDataTable = field(default_factory=AnalyzeDataTable)
    loss: LossTable = field(default_factory=LossTable)
    curvature: CurvatureTable = field(default_factory=CurvatureTable)
    estimators: EstimatorsTable = field(default_factory=EstimatorsTable)
    output: AnalyzeOutputTable = field(default_factory=AnalyzeOutputTable)

    def check(self, path: str) -> None:
        reserved = sorted({"params", "progress"} & set(self.curvature.options))
        if reserved:
            raise ConfigError(f"[curvature] options in {path} may not set {', '.join(reserved)}: the command "
                              "sets them (all parameters; progress from [output] progress)")
        _check_curvature_options("[curvature] options", self.curvature.backend, self.curvature.options)


@dataclass
class TrainConfig(Config):
    """``curvopt train``."""

    model: ModelTable = field(default_factory=ModelTable)
    data: DataTable = field(default_factory=DataTable)
    optimizer: OptimizerTable = field(default_factory=OptimizerTable)
    train: TrainTable = field(default_factory=TrainTable)
    schedule: ScheduleTable = field(default_factory=ScheduleTable)
    output: OutputTable = field(default_factory=OutputTable)

    def check(self, path: str) -> None:
        check_optimizer_options(self.optimizer.name, self.optimizer.options)


@dataclass
class QuantizeConfig(Config):
    """``curvopt quantize``."""

    model: QuantizeModelTable = field(default_factory=QuantizeModelTable)
    data: QuantizeDataTable = field(default_factory=QuantizeDataTable)
    loss: LossTable = field(default_factory=LossTable)
    sensitivity: SensitivityTable = field(default_factory=SensitivityTable)
    quantizer: QuantizerTable = field(default_factory=QuantizerTable)
    allocation: AllocationTable = field(default_factory=AllocationTable)
    finetune: FinetuneTable = field(default_factory=FinetuneTable)
    output: QuantizeOutputTable = field(default_factory=QuantizeOutputTable)

    def check(self, path: str) -> None:
        _check_quantize(self, path)


#: The config of each command (``load_config(path, DEFAULTS)``...).
DEFAULTS = AnalyzeConfig
TRAIN_DEFAULTS = TrainConfig
QUANTIZE_DEFAULTS = QuantizeConfig


# ---- loading and checking -----------------------------------------------------------------------------------


def load_config(path: str | None, defaults: type[Config] = AnalyzeConfig) -> Any:
    """The config ``defaults`` (a config class: :data:`DEFAULTS`, :data:`TRAIN_DEFAULTS`,
    :data:`QUANTIZE_DEFAULTS`) overridden by the TOML file at ``path``, validated.

    Raises:
        ConfigError: a missing or malformed file, an unknown table or key, a value of the wrong type, a
            number out of range, a name that is not a valid choice, or options the named object does not take;
            the message names ``[table] key`` and the valid choices.
    """
    config = defaults()
    if path is None:
        return config
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        user = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    for section, values in user.items():
        if section not in config:
            raise ConfigError(f"unknown section [{section}] in {path}; valid: {', '.join(config)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] in {path} must be a table")
        table = config[section]
        for name, value in values.items():
            if name not in table:
                raise ConfigError(f"unknown key '{name}' in [{section}] of {path}; valid: {', '.join(table)}")
            table[name] = _typed(section, table, name, value, path)
    _check_choices(config)
    _check_ranges(config, path)
    config.check(path)
    return config


def _typed(section: str, table: Table, name: str, value: Any, path: str) -> Any:
    """``value`` as the type of ``[section] name``: an int for a float, a number for a list of one."""
    hint = typing.get_type_hints(type(table))[name]
    expected = typing.get_origin(hint) or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is list and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]  # one budget: average_bits = 3.0 means [3.0]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"[{section}] {name} = {value!r} should be a {expected.__name__} in {path}")
    return value


def _keys(config: Config) -> Iterator[tuple[str, Table, dataclasses.Field]]:
    for section in config:
        table = config[section]
        for f in dataclasses.fields(table):
            yield section, table, f


def _check_choices(config: Config) -> None:
    """Every name among its valid choices (registry names read now)."""
    for section, table, f in _keys(config):
        choices = f.metadata.get("choices")
        if choices is None:
            continue
        valid = tuple(choices() if callable(choices) else choices)
        value = getattr(table, f.name)
        if value not in valid:
            raise ConfigError(f"[{section}] {f.name} = {value!r}; valid: {', '.join(valid)}")


def _check_ranges(config: Config, path: str) -> None:
    """Every number finite and within its range, so that no run fails after its computation."""
    for section, table, f in _keys(config):
        low = f.metadata.get("low")
        if low is None:
            continue
        value, inclusive = getattr(table, f.name), f.metadata["inclusive"]
        ok = math.isfinite(value) and (value >= low if inclusive else value > low)
        if not ok:
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ConfigError(f"[{section}] {f.name} = {value!r} in {path}; it must be a finite number {bound}")


def _check_curvature_options(where: str, backend: str, options: dict[str, Any]) -> None:
    """Option names the backend does not take (a wrapper's options are checked when it builds its base)."""
    from curvopt.curvature.registry import CURVATURES

    if getattr(CURVATURES.get(backend), "forwards_options", False):
        return
    try:
        CURVATURES.check_options(backend, options)
    except CurvoptError as e:
        raise ConfigError(f"{where}: {e}") from e


def optimizer_option_names(name: str) -> list[str]:
    """The ``[optimizer] options`` keys optimizer ``name`` takes (its keyword arguments but ``params``, ``lr``)."""
    from curvopt.optim.registry import OPTIMIZERS

    return list(OPTIMIZERS.options(name))


def check_optimizer_options(name: str, options: dict[str, Any]) -> None:
    """Reject ``[optimizer] options`` that optimizer ``name`` does not take, listing the valid ones."""
    valid = optimizer_option_names(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"[optimizer] options for {name!r} has unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(valid)}")


def schedule_option_names(name: str) -> list[str]:
    """The ``[schedule] options`` keys schedule ``name`` takes (its keyword arguments, less those the command
    sets)."""
    from curvopt.schedule.registry import SCHEDULES

    return [n for n in SCHEDULES.options(name) if n not in SCHEDULE_RESERVED]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_quantize(config: QuantizeConfig, path: str) -> None:
    """The ``quantize`` values that are not plain numbers (lists of bit widths and budgets, fixed layers, the
    quantizer and its options, the sensitivity options), checked before the data is built. What needs the
    model (fixed module names, size budgets, budgets with fixed layers) is checked by the command."""
    from curvopt.quant.plan import MAX_BITS, MIN_BITS

    hidden = config["model"]["hidden"]
    if not hidden or not all(_is_int(h) and h >= 1 for h in hidden):
        raise ConfigError(f"[model] hidden = {hidden!r} in {path}; it must be a non-empty list of positive "
                          f"integers (the MLP's hidden widths, e.g. [128, 128])")
    a = config["allocation"]
    width = f"an integer in [{MIN_BITS}, {MAX_BITS}]"
    bits = a["bits"]
    if not bits or not all(_is_int(b) and MIN_BITS <= b <= MAX_BITS for b in bits):
        raise ConfigError(f"[allocation] bits = {bits!r} in {path}; each must be {width}, "
                          f"e.g. bits = [2, 3, 4, 8]")
    if len(set(bits)) != len(bits):
        raise ConfigError(f"[allocation] bits = {bits!r} in {path} lists a width twice; list each once")
    for name in ("average_bits", "size_bytes"):
        bad = [v for v in a[name] if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v) or v <= 0]
        if bad:
            raise ConfigError(f"[allocation] {name} = {a[name]!r} in {path}; each budget must be a finite "
                              f"number > 0")
    if a["average_bits"] and a["size_bytes"]:
        raise ConfigError(f"[allocation] gives both average_bits and size_bytes in {path}; a budget is one or the "
                          f"other: drop one of them")
    low = min(bits)
    small = [v for v in a["average_bits"] if v < low]
    if small:
        raise ConfigError(f"[allocation] average_bits = {small[0]!r} in {path} is below the smallest model, "
                          f"every module at min(bits) = {low} bits: raise it to >= {low} or add a narrower "
                          f"width to bits")
    a["average_bits"] = [float(v) for v in a["average_bits"]]
    for name, b in a["fixed"].items():
        if not _is_int(b) or not MIN_BITS <= b <= MAX_BITS:
            raise ConfigError(f"[allocation] fixed = {{ {name} = {b!r} }} in {path}; the bits must be {width}")
    sensitivity_curvature(config)
    act = config["quantizer"]["activation_bits"]
    if act and not MIN_BITS <= act <= MAX_BITS:
        raise ConfigError(f"[quantizer] activation_bits = {act} in {path}; 0 (weights only) or {width}")
    make_quantizer(config)  # its options, on no data
    reserved = sorted(set(config["sensitivity"]["options"]) & _sensitivity_keywords())
    if reserved:
        raise ConfigError(f"[sensitivity] options in {path} may not set {', '.join(reserved)}: the command sets "
                          f"them (from [sensitivity], [quantizer], [allocation] bits and [output] progress)")
    options = config["sensitivity"]["options"]
    _check_curvature_options("[sensitivity] options", sensitivity_curvature(config), options)


def sensitivity_curvature(config: Any) -> str:
    """The curvature backend of ``[sensitivity]``: ``curvature``, or when empty the score's own
    (:data:`curvopt.quant.scores.SCORES`: the Fisher for ``"fisher"``, else the Hessian).

    Raises:
        ConfigError: an unknown backend, or one the score does not accept (``"fisher"`` on one that is no
            Fisher).
    """
    from curvopt.quant.scores import SCORES

    score, name = config["sensitivity"]["score"], config["sensitivity"]["curvature"]
    spec = SCORES.get(score)
    valid = _curvatures()
    if name and name not in valid:
        raise ConfigError(f"[sensitivity] curvature = {name!r}; valid: {', '.join(valid)} (or \"\": the score's "
                          f"own)")
    if spec.curvatures and name and name not in spec.curvatures:
        raise ConfigError(f"[sensitivity] score = {score!r} needs curvature = one of "
                          f"{', '.join(spec.curvatures)} (or \"\"), got {name!r}; or use score = 'hawq_v2'")
    return name or spec.default_curvature


def _sensitivity_keywords() -> set[str]:
    """The keywords of :func:`curvopt.sensitivity` that the command sets (the rest are backend options)."""
    import curvopt

    names = set(inspect.signature(curvopt.sensitivity).parameters) - {"model", "loader", "loss_fn", "options"}
    return names | {"params"}


def make_quantizer(config: Any) -> Any:
    """The ``[quantizer]`` of ``config``; bad options are a :class:`ConfigError` naming them."""
    from curvopt.quant.quantizer import make_quantizer as build

    name, options = config["quantizer"]["name"], config["quantizer"]["options"]
    try:
        return build(name, **options)
    except (CurvoptError, TypeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"[quantizer] {name} with options = {options!r}: {first}") from e


__all__ = [
    "AnalyzeConfig",
    "Config",
    "DEFAULTS",
    "QUANTIZE_DEFAULTS",
    "QuantizeConfig",
    "TRAIN_DEFAULTS",
    "Table",
    "TrainConfig",
    "load_config",
]
