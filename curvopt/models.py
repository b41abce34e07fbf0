"""Small reference networks for the embedded datasets (tutorials, benchmarks, CLI)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from curvopt.errors import ShapeError


def mlp(widths: Sequence[int] = (40, 256, 256, 10), activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A fully connected network ``widths[0] -> ... -> widths[-1]`` with ``activation`` between."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def cnn1d(length: int = 40, channels: int = 32, classes: int = 10, *, conv_layers: int = 2) -> nn.Sequential:
    """A small Conv1d network for 1-D signals ``[N, length]`` (e.g. mnist1d) -> logits ``[N, classes]``.

    ``conv_layers`` 5-tap convolutions of ``channels`` channels, each followed by ReLU, every second one
    with stride 2 (the default two: stride 1 then 2), and a linear classifier on the flattened features.
    ``conv_layers=5`` gives a deeper net with six quantizable layers (the quantization benchmark's).

    Raises:
        ShapeError: ``conv_layers < 1``.
    """
    if conv_layers < 1:
        raise ShapeError(f"cnn1d(conv_layers={conv_layers}): at least one convolution is needed")
    layers: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    n = length
    for i in range(conv_layers):
        stride = 2 if i % 2 else 1
        layers += [nn.Conv1d(1 if i == 0 else channels, channels, 5, stride=stride, padding=2), nn.ReLU()]
        if stride == 2:
            n = (n + 1) // 2  # 5 taps, padding 2, stride 2: ceil(n / 2)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * n, classes))


def digits_cnn(classes: int = 10, *, channels: int = 16, hidden: int = 64) -> nn.Sequential:
    """A Conv2d network for scikit-learn's 8x8 digits given as ``[N, 64]`` -> logits ``[N, classes]``.

    Four 3x3 convolutions with ReLU (``channels``, ``channels``, then ``2 * channels`` at stride 2 down to
    4x4, and ``2 * channels``), a hidden Linear layer of ``hidden`` units with ReLU and a linear classifier:
    six quantizable layers.
    """
    c, c2 = channels, 2 * channels
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, c2, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 4 * 4, hidden), nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def _tokens(length: int, patch: int, builder: str) -> int:
    if patch < 1 or length < 1 or length % patch:
        raise ShapeError(
            f"{builder}(length={length}, patch={patch}): the input of length {length} is read as "
            f"length // patch tokens of patch features, so length must be a positive multiple of patch "
            f"(e.g. patch in {[d for d in range(1, length + 1) if length % d == 0] if length > 0 else [1]})"
        )
    return length // patch


class Patches(nn.Module):
    """Reads ``[..., length]`` signals as ``[..., length // patch, patch]`` token sequences.

    Works on batched inputs ``[N, length]`` and on single samples ``[length]`` (as under
    ``torch.func.vmap`` over samples).
    """

    def __init__(self, length: int, patch: int) -> None:
        super().__init__()
        self.length, self.patch = length, patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.length:
            raise ShapeError(f"expected inputs [N, {self.length}] (built with length={self.length}), "
                             f"got {list(x.shape)}")
        return x.unflatten(-1, (self.length // self.patch, self.patch))

    def extra_repr(self) -> str:
        return f"length={self.length}, patch={self.patch}"


class LearnedPositions(nn.Module):
    """Adds a learned embedding ``[tokens, d_model]`` to each token of ``[..., tokens, d_model]``."""

    def __init__(self, tokens: int, d_model: int) -> None:
        super().__init__()
        # small init, as BERT/ViT: positions start as a perturbation of the token embedding
        self.weight = nn.Parameter(0.02 * torch.randn(tokens, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class MeanPool(nn.Module):
    """Mean over the token axis: ``[..., tokens, d] -> [..., d]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(-2)


class TransformerClassifier(nn.Module):
    """Patch embedding, learned positions, ``nn.TransformerEncoder``, mean pooling, LayerNorm, Linear.

    Built by :func:`transformer`; submodules ``patches``, ``embed``, ``pos``, ``encoder``,
    ``pool``, ``norm``, ``head`` (names show up in per-layer reports).
    """

    def __init__(self, length: int, classes: int, patch: int, d_model: int, heads: int, layers: int,
                 dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        tokens = _tokens(length, patch, "transformer")
        if d_model % heads:
            raise ShapeError(f"transformer(d_model={d_model}, heads={heads}): d_model must be a multiple of "
                             f"heads (each head gets d_model // heads features)")
        self.patches = Patches(length, patch)
        self.embed = nn.Linear(patch, d_model)
        self.pos = LearnedPositions(tokens, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward, dropout, batch_first=True)
        # enable_nested_tensor only matters with padding masks (none here) and warns for some settings
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool = MeanPool()
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pos(self.embed(self.patches(x)))
        return self.head(self.norm(self.pool(self.encoder(h))))


def transformer(length: int = 40, classes: int = 10, *, patch: int = 4, d_model: int = 32, heads: int = 4,
                layers: int = 2, dim_feedforward: int = 64, dropout: float = 0.1) -> nn.Module:
    """A small transformer classifier for 1-D signals ``[N, length]`` (e.g. mnist1d) -> logits ``[N, classes]``.

    The signal is read as ``length // patch`` tokens of ``patch`` features (as ViT reads image
    patches, Dosovitskiy et al., 2021), embedded by a Linear layer plus a learned positional
    embedding, encoded by ``layers`` ``nn.TransformerEncoderLayer(d_model, heads, dim_feedforward,
    dropout, batch_first=True)`` with PyTorch's other defaults (post-norm, ReLU), mean-pooled over
    tokens, normalized by a LayerNorm and classified by a Linear layer.

    Raises:
        ShapeError: ``length`` is not a multiple of ``patch`` or ``d_model`` not a multiple of ``heads``.
    """
    return TransformerClassifier(length, classes, patch, d_model, heads, layers, dim_feedforward, dropout)


class LastState(nn.Module):
    """The output of a batch-first recurrent layer at the last time step: ``[..., T, H] -> [..., H]``."""

    def forward(self, out: tuple[torch.Tensor, object]) -> torch.Tensor:
        return out[0][..., -1, :]


def lstm(length: int = 40, classes: int = 10, *, patch: int = 4, hidden: int = 32) -> nn.Sequential:
    """An LSTM classifier for 1-D signals ``[N, length]`` -> logits ``[N, classes]``.

    The signal is read as ``length // patch`` time steps of ``patch`` features (as in
    :func:`transformer`), run through one ``nn.LSTM(patch, hidden, batch_first=True)``, and the
    output of the last step is classified by a Linear layer. Submodules ``patches``, ``lstm``,
    ``last``, ``head``.

    Raises:
        ShapeError: ``length`` is not a multiple of ``patch``.
    """
    _tokens(length, patch, "lstm")
    return nn.Sequential(OrderedDict(patches=Patches(length, patch), lstm=nn.LSTM(patch, hidden, batch_first=True),
                                     last=LastState(), head=nn.Linear(hidden, classes)))
