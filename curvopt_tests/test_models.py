"""The reference networks: shapes, parameter counts, the sequence reading, train and eval mode."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from curvopt.errors import ShapeError
from curvopt.models import cnn1d, digits_cnn, lstm, transformer


def transformer_parameters(length, classes, patch, d, layers, ff):
    """Parameter count of :func:`transformer` by hand (PyTorch's layer sizes)."""
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d
    return (patch * d + d) + (length // patch) * d + layers * per_layer + 2 * d + (d * classes + classes)


def test_transformer_defaults():
    torch.manual_seed(0)
    model = transformer()
    assert sum(p.numel() for p in model.parameters()) == transformer_parameters(40, 10, 4, 32, 2, 64) == 17962
    layer = model.encoder.layers[0]
    assert isinstance(layer, nn.TransformerEncoderLayer) and len(model.encoder.layers) == 2
    assert layer.self_attn.batch_first and layer.self_attn.num_heads == 4
    assert layer.dropout.p == 0.1 and not layer.norm_first  # PyTorch's defaults otherwise
    assert model(torch.randn(7, 40)).shape == (7, 10)


@given(patch=st.sampled_from([1, 2, 4, 8]), heads=st.sampled_from([1, 2, 4]), head_dim=st.integers(1, 4),
       layers=st.integers(1, 2), ff=st.integers(1, 16), classes=st.integers(2, 5), n=st.integers(1, 3))
def test_transformer_shapes_and_counts(patch, heads, head_dim, layers, ff, classes, n):
    d = heads * head_dim
    model = transformer(16, classes, patch=patch, d_model=d, heads=heads, layers=layers, dim_feedforward=ff)
    assert sum(p.numel() for p in model.parameters()) == transformer_parameters(16, classes, patch, d, layers, ff)
    x = torch.randn(n, 16)
    assert model(x).shape == (n, classes)
    model.eval()
    with torch.no_grad():
        batched = model(x)
        single = torch.stack([model(xi) for xi in x])  # one sample [length] reads as one sequence
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_lstm_shapes_and_count():
    torch.manual_seed(0)
    model = lstm()
    rnn = model.lstm
    assert isinstance(rnn, nn.LSTM) and rnn.input_size == 4 and rnn.hidden_size == 32 and rnn.batch_first
    assert sum(p.numel() for p in model.parameters()) == 4 * (32 * 4 + 32 * 32 + 2 * 32) + 32 * 10 + 10
    x = torch.randn(6, 40)
    assert model(x).shape == (6, 10)
    small = lstm(12, 3, patch=3, hidden=5)
    assert small(torch.randn(2, 12)).shape == (2, 3)


def test_lstm_reads_patches_in_order():
    """The classifier sees the last time step, i.e. the last ``patch`` features of the signal."""
    torch.manual_seed(0)
    model = lstm(8, 2, patch=2, hidden=3)
    x = torch.randn(1, 8)
    seq = x.view(1, 4, 2)
    expected = model.head(model.lstm(seq)[0][:, -1])
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("build", [transformer, lstm])
def test_length_must_divide_into_patches(build):
    with pytest.raises(ShapeError, match=r"length=40, patch=3.*multiple of patch"):
        build(40, patch=3)
    with pytest.raises(ShapeError, match="expected inputs"):
        build(40, patch=4)(torch.randn(2, 36))


def test_transformer_heads_must_divide_width():
    with pytest.raises(ShapeError, match="d_model=30, heads=4"):
        transformer(d_model=30, heads=4)


def test_transformer_train_and_eval_mode():
    torch.manual_seed(0)
    model = transformer(dropout=0.5)
    x = torch.randn(8, 40)
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # dropout active
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        e1, e2 = model(x), model(x)  # eval mode may take PyTorch's fused fast path
    torch.testing.assert_close(e1, e2)
    # the same network without dropout in train mode computes the same function (slow path)
    plain = transformer(dropout=0.0)
    plain.load_state_dict(model.state_dict())
    plain.train()
    torch.testing.assert_close(plain(x), e1, rtol=1e-5, atol=1e-5)


def test_cnn1d_default_is_the_two_layer_network():
    """``conv_layers`` left at its default builds today's network: same modules, same draws from the RNG."""
    torch.manual_seed(0)
    model = cnn1d()
    torch.manual_seed(0)
    by_hand = nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
                            nn.Conv1d(32, 32, 5, stride=2, padding=2), nn.ReLU(), nn.Flatten(),
                            nn.Linear(32 * 20, 10))
    assert str(model) == str(by_hand)
    for (k, a), (_, b) in zip(model.state_dict().items(), by_hand.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


@given(conv_layers=st.integers(1, 6), length=st.integers(1, 45), channels=st.integers(1, 4), n=st.integers(1, 3))
def test_cnn1d_conv_layers_shapes_and_counts(conv_layers, length, channels, n):
    model = cnn1d(length, channels, 3, conv_layers=conv_layers)
    convs = [m for m in model if isinstance(m, nn.Conv1d)]
    assert len(convs) == conv_layers
    assert [c.stride[0] for c in convs] == [1 + i % 2 for i in range(conv_layers)]  # every second one halves
    out_len = length
    for _ in range(conv_layers // 2):
        out_len = -(-out_len // 2)
    assert model[-1].in_features == channels * out_len
    assert model(torch.randn(n, length)).shape == (n, 3)


def test_cnn1d_needs_a_convolution():
    with pytest.raises(ShapeError, match="conv_layers=0"):
        cnn1d(conv_layers=0)


def test_digits_cnn_shapes_and_count():
    torch.manual_seed(0)
    model = digits_cnn()
    weighted = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 6
    c = 16
    convs = (9 * c + c) + (9 * c * c + c) + (9 * c * 2 * c + 2 * c) + (9 * 4 * c * c + 2 * c)
    assert sum(p.numel() for p in model.parameters()) == convs + (2 * c * 16 * 64 + 64) + (64 * 10 + 10)
    assert model(torch.randn(5, 64)).shape == (5, 10)
    small = digits_cnn(3, channels=2, hidden=4)
    assert small(torch.randn(2, 64)).shape == (2, 3)
