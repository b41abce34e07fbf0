"""What every command builds before its own work: the embedded dataset, the ``[model]`` network, a checkpoint
read and fitted, the loss and accuracy of a model, and the short Adam training that ``analyze`` and
``quantize`` run when no checkpoint is given.

The commands call :func:`_dataset` and :func:`_train` through the package (``curvopt.cli._dataset``), so
that a test can put a stand-in there and see which command builds data or trains before its checks.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvopt.errors import ConfigError


def _dataset(config: Any) -> Any:
    """The embedded dataset named by ``[data] dataset`` (``X_train``, ``y_train``, ``X_test``, ``y_test``)."""
    from curvopt.data import digits, mnist1d

    return mnist1d() if config["data"]["dataset"] == "mnist1d" else digits()


def _model(config: Any, features: int, classes: int) -> nn.Module:
    """The ``[model] arch`` network for inputs ``[N, features]``: the transformer and the LSTM
    read the signal as a sequence of patches of 4 values (:func:`curvopt.models.transformer`); the MLP
    has the hidden widths ``[model] hidden`` and the CNN ``[model] conv_layers`` convolutions (quantize
    configs; 128, 128 and 2 for the others)."""
    from curvopt.models import cnn1d, lstm, mlp, transformer

    torch.manual_seed(config["model"]["seed"])
    arch = config["model"]["arch"]
    if arch == "cnn1d":
        return cnn1d(length=features, classes=classes, conv_layers=config["model"].get("conv_layers", 2))
    if arch == "transformer":
        return transformer(features, classes)
    if arch == "lstm":
        return lstm(features, classes)
    return mlp((features, *config["model"].get("hidden", (128, 128)), classes))


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The ``state_dict`` saved with ``torch.save`` at ``path``, read with ``weights_only=True``.

    Raises:
        ConfigError: the file is missing or is not a state dict (a pickled module, a tensor, an
            optimizer state, a corrupt file).
    """
    if not Path(path).is_file():
        raise ConfigError(f"[model] checkpoint not found: {path}")
    fix = "save one with torch.save(model.state_dict(), path)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: pickled modules, corrupt or foreign files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"[model] checkpoint {path} cannot be read as a state dict ({first}); {fix}") from e
    if not (isinstance(state, dict) and state and
            all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        kind = type(state).__name__ if not isinstance(state, dict) else "dict that is not a state dict"
        raise ConfigError(f"[model] checkpoint {path} holds a {kind}, not a model's state dict; {fix}")
    return state


def _load_checkpoint(model: nn.Module, state: dict[str, torch.Tensor], path: str, arch: str) -> None:
    """Load ``state`` (read from ``path``) into ``model``.

    Raises:
        ConfigError: ``state`` is the state dict of another architecture.
    """
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = lines[1] if len(lines) > 1 else lines[0]  # "Missing key(s) ...", "size mismatch ..."
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise ConfigError(f"[model] checkpoint {path} does not fit a {arch}: {detail}") from e


def _evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn: Any = None) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` on ``(X, y)`` without gradients."""
    with torch.no_grad():
        out = model(X)
        loss = float((loss_fn or nn.CrossEntropyLoss())(out, y))
        return loss, float((out.argmax(1) == y).float().mean())


def _on_device(data: Any, device: torch.device) -> Any:
    """``data`` with its tensors on ``device`` (a copy; the same object on the CPU)."""
    if device.type == "cpu":
        return data
    moved = copy.copy(data)
    for name in ("X_train", "y_train", "X_test", "y_test"):
        setattr(moved, name, getattr(data, name).to(device))
    return moved


def _train(model: nn.Module, data: Any, loss_fn: Any, config: Any, progress: bool) -> None:
    """``[model] train_epochs`` of Adam at ``[model] lr`` on the training split (batches of 128, shuffled with
    ``[model] seed``); leaves the model in eval mode."""
    from tqdm.auto import tqdm

    epochs = config["model"]["train_epochs"]
    opt = torch.optim.Adam(model.parameters(), lr=config["model"]["lr"])
    loader = data.loader(batch_size=128, shuffle=True, seed=config["model"]["seed"])
    model.train()
    for _ in tqdm(range(epochs), desc="training", unit="epoch", disable=not progress):
        for X, y in loader:
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step()
    model.eval()
