"""ValueHead: shapes and dtypes for every head type, initialisation scale, save/load round trip, errors."""

import json
import math

import pytest
import torch

from trl_gae_ext.value_head import VALUE_HEAD_TYPES, ValueHead


# head_type, mlp_hidden_size, dropout
HEAD_CONFIGS = [
    ("linear", None, 0.0),
    ("linear", None, 0.1),
    ("mlp", None, 0.0),
    ("mlp", 24, 0.1),
]


@pytest.mark.parametrize("head_type,mlp_hidden_size,dropout", HEAD_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shapes_and_float32_output(head_type, mlp_hidden_size, dropout, dtype):
    torch.manual_seed(0)
    head = ValueHead(16, head_type=head_type, mlp_hidden_size=mlp_hidden_size, dropout=dropout).eval()
    hidden = torch.randn(3, 5, 16)
    out = head(hidden.to(dtype))
    assert out.shape == (3, 5) and out.dtype == torch.float32
    # the head computes in float32: only the input rounding differs from a float32 forward
    torch.testing.assert_close(out, head(hidden.to(dtype).float()), rtol=0, atol=0)
    assert head.out.weight.dtype == torch.float32


@pytest.mark.parametrize("head_type,mlp_hidden_size,dropout", HEAD_CONFIGS)
def test_gradients_reach_the_head_and_the_hidden_states(head_type, mlp_hidden_size, dropout):
    head = ValueHead(8, head_type=head_type, mlp_hidden_size=mlp_hidden_size, dropout=dropout)
    hidden = torch.randn(2, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    head(hidden).pow(2).sum().backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.bfloat16
    for name, param in head.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert head.out.weight.grad.abs().sum() > 0


def test_mlp_layout():
    head = ValueHead(16, head_type="mlp", mlp_hidden_size=24)
    assert head.summary[0].in_features == 16 and head.summary[0].out_features == 24
    assert head.out.in_features == 24 and head.out.out_features == 1
    assert ValueHead(16, head_type="mlp").out.in_features == 16  # default M = H
    assert ValueHead(16).out.in_features == 16


def test_default_init_std_matches_one_over_sqrt_fan_in_plus_one():
    torch.manual_seed(0)
    # 8192 samples: the sample std is within ~1.6% of the true std with high probability (4 sigma < 5%)
    head = ValueHead(8192)
    expected = 1 / math.sqrt(8192 + 1)
    assert abs(head.out.weight.std().item() / expected - 1) < 0.05
    assert abs(head.out.weight.mean().item()) < 4 * expected / math.sqrt(8192)
    assert (head.out.bias == 0).all()

    mlp = ValueHead(64, head_type="mlp", mlp_hidden_size=8192)
    assert abs(mlp.out.weight.std().item() * math.sqrt(8192 + 1) - 1) < 0.05


def test_default_init_std_small_hidden_size_keeps_the_plus_one():
    # H = 3: std 1/sqrt(4) = 0.5, not 1/sqrt(3) = 0.577; pooled over 1500 heads (4500 weights, ~2% precision)
    torch.manual_seed(0)
    weights = torch.cat([ValueHead(3).out.weight.flatten() for _ in range(1500)])
    assert abs(weights.std().item() / 0.5 - 1) < 0.06


def test_custom_init_std():
    torch.manual_seed(0)
    head = ValueHead(8192, init_std=0.5)
    assert abs(head.out.weight.std().item() / 0.5 - 1) < 0.05


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    head = ValueHead(32, dropout=0.5)
    hidden = torch.randn(4, 6, 32)
    head.train()
    assert not torch.equal(head(hidden), head(hidden))
    head.eval()
    torch.testing.assert_close(head(hidden), head(hidden), rtol=0, atol=0)


def test_cast_head_still_returns_float32():
    head = ValueHead(16).to(torch.bfloat16)
    out = head(torch.randn(2, 3, 16))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("head_type,mlp_hidden_size,dropout", HEAD_CONFIGS)
def test_save_load_round_trip(tmp_path, head_type, mlp_hidden_size, dropout):
    torch.manual_seed(1)
    head = ValueHead(16, head_type=head_type, mlp_hidden_size=mlp_hidden_size, dropout=dropout, init_std=0.3)
    with torch.no_grad():  # make the bias non-zero so it is checked too
        head.out.bias.fill_(0.25)
    head.save_pretrained(tmp_path)
    assert (tmp_path / "value_head.safetensors").is_file()
    config = json.loads((tmp_path / "value_head_config.json").read_text())
    assert config == {
        "hidden_size": 16,
        "head_type": head_type,
        "mlp_hidden_size": mlp_hidden_size,
        "dropout": dropout,
        "init_std": 0.3,
    }

    loaded = ValueHead.from_pretrained(tmp_path)
    assert loaded.config == head.config
    hidden = torch.randn(2, 7, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(loaded.eval()(hidden), head.eval()(hidden), rtol=0, atol=0)
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_unknown_head_type_lists_valid_types():
    assert VALUE_HEAD_TYPES == ("linear", "mlp")
    with pytest.raises(ValueError, match="linear, mlp"):
        ValueHead(16, head_type="transformer")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"init_std": -0.1}, "init_std"),
        ({"head_type": "mlp", "mlp_hidden_size": -3}, "mlp_hidden_size"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"hidden_size": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        ValueHead(**args)


def test_wrong_hidden_size_raises():
    with pytest.raises(ValueError, match="last dimension 16"):
        ValueHead(16)(torch.randn(2, 3, 8))
