"""Small reference networks for the embedded datasets (tutorials, benchmarks, CLI)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(widths: Sequence[int] = (40, 256, 256, 10), activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A fully connected network ``widths[0] -> ... -> widths[-1]`` with ``activation`` between."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def cnn1d(length: int = 40, channels: int = 32, classes: int = 10) -> nn.Sequential:
    """A small Conv1d network for 1-D signals ``[N, length]`` (e.g. mnist1d).

    Two 5-tap convolutions (the second with stride 2), ReLU, and a linear classifier.
    """
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, channels, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * ((length + 1) // 2), classes),
    )
