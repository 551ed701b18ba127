"""The native NF4 matmul (issue 30) against bitsandbytes on the real 4-bit SmolLM2.

* its dequantised weights are bitsandbytes' `dequantize_4bit`, bit for bit, in every 4-bit
  layer of the model (double-quantised scales), and in layers quantised with plain float32
  scales, blocksize 128, and a bias;
* its products are the exact float64 product of those weights and the input, rounded to
  bf16, within the error bound of a float32 sum (only the summation order is its own), in
  both paths: a few rows and many (a decode batch);
* prompt tokens ([rows, T > 1, in]) give bitsandbytes' own outputs bit for bit (its
  weights, then torch's GEMM): the engine's prompt passes stay PEFT's numbers;
* a model it cannot read exactly (fp4) is refused with the reason, never computed.

Greedy tokens equal to PEFT's with the kernel in the engine: tests/test_engine.py and the
other PEFT tests, which run it on every machine where `--nf4-kernel auto` picks it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from loramux.core.models import ResolvedModel, load_base_model
from loramux.server.native_build import NativeKernelUnavailable
from loramux.server.nf4 import choose_kernel, four_bit_layers, use_nf4_kernel
from loramux.server.nf4.native import NativeNf4Linear, load_kernel

CPU = torch.device("cpu")

try:
    KERNEL = load_kernel()
    UNAVAILABLE = ""
except NativeKernelUnavailable as exc:  # pragma: no cover - CI and dev machines have it
    UNAVAILABLE = str(exc)
pytestmark = pytest.mark.skipif(bool(UNAVAILABLE), reason=f"NF4 kernel: {UNAVAILABLE}")


@pytest.fixture(scope="module")
def model(smollm2: ResolvedModel) -> Iterator[Any]:
    yield load_base_model(smollm2, "nf4", "cpu")


def _layer(
    in_features: int,
    out_features: int,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    bias: bool = False,
    quant_type: str = "nf4",
    seed: int = 0,
) -> Any:
    """A bitsandbytes 4-bit layer quantised from random bf16 weights on the CPU."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=torch.bfloat16,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    layer.weight = bnb.nn.Params4bit(
        torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.05,
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant_type,
        blocksize=blocksize,
        module=layer,
    )
    if bias:
        layer.bias = nn.Parameter(torch.randn(out_features, dtype=torch.bfloat16), False)
    return layer.to(CPU)


def _bnb_weights(layer: Any) -> torch.Tensor:  # [out, in] bf16
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape, name
    differ = int((got.view(torch.int16) != want.view(torch.int16)).sum())
    assert differ == 0, f"{name}: {differ} weights differ from bitsandbytes'"


def test_dequantised_weights_are_bitsandbytes_bit_for_bit(model: Any) -> None:
    layers = four_bit_layers(model)
    assert len(layers) == 210  # 30 decoder layers x 7 projections
    for name, layer in layers:
        _assert_same_bits(KERNEL.dequantize(layer.weight), _bnb_weights(layer), name)


@pytest.mark.parametrize(
    "options",
    [
        {"double_quant": False},
        {"blocksize": 128},
        {"blocksize": 128, "double_quant": False, "bias": True},
    ],
)
def test_other_quantisation_layouts_bit_for_bit(options: dict[str, Any]) -> None:
    layer = _layer(256, 96, **options)
    _assert_same_bits(KERNEL.dequantize(layer.weight), _bnb_weights(layer), str(options))


def _assert_within_float32_sum_bound(
    got: torch.Tensor,  # [rows, out] bf16
    x: torch.Tensor,  # [rows, in] bf16
    weights: torch.Tensor,  # [out, in] bf16
    bias: torch.Tensor | None,
) -> None:
    """|got - exact| <= half a bf16 step of the exact value (the final rounding) plus the
    float32 sum's error bound, n * 2^-24 * sum |x_k w_k| (any order of n terms)."""
    products = x.double()[:, None, :] * weights.double()[None, :, :]  # [rows, out, in]
    exact = products.sum(-1) + (bias.double() if bias is not None else 0.0)
    magnitude = products.abs().sum(-1)
    n = x.shape[1] + 1
    _, exponent = torch.frexp(exact.abs().clamp_min(2.0**-126))
    half_step = torch.ldexp(torch.ones_like(exact), exponent - 9)  # bf16: 8 bits, 1 implicit
    bound = half_step + n * 2.0**-24 * magnitude
    excess = (got.double() - exact).abs() - bound
    assert float(excess.max()) <= 0.0, f"{int((excess > 0).sum())} outputs outside the bound"


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 32, 37])
def test_products_within_the_float32_bound_in_both_paths(model: Any, rows: int) -> None:
    """rows <= 4: the decode path; more: the tiled one (37: a row block and a tail)."""
    layers = dict(four_bit_layers(model))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.5.mlp.down_proj"):
        layer = layers[name]
        native = NativeNf4Linear(layer, KERNEL)
        x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows))
        x = x.bfloat16()
        with torch.inference_mode():
            got = native(x)
            decode_shaped = native(x.view(rows, 1, -1))  # [rows, 1 token, in] as decode calls
            prompt = native(x.view(1, rows, -1))  # [1, tokens, in]: a prompt
            bnb_prompt = layer(x.view(1, rows, -1))
        torch.testing.assert_close(decode_shaped.view(rows, -1), got, rtol=0, atol=0)
        _assert_within_float32_sum_bound(got, x, _bnb_weights(layer), None)
        if rows > 1:  # prompt tokens: bitsandbytes' numbers, bit for bit
            _assert_same_bits(prompt, bnb_prompt, f"{name}, a prompt of {rows} tokens")


def test_bias_and_odd_output_count() -> None:
    """An odd number of outputs (the tiled path's last pair is one row) and a bias."""
    layer = _layer(128, 33, double_quant=False, bias=True, seed=3)
    native = NativeNf4Linear(layer, KERNEL)
    for rows in (1, 9):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).bfloat16()
        with torch.inference_mode():
            got = native(x)
        _assert_within_float32_sum_bound(got, x, _bnb_weights(layer), layer.bias)


def test_fp4_is_refused_with_the_reason() -> None:
    model = nn.Sequential(_layer(128, 64, quant_type="fp4"))
    assert choose_kernel("auto", CPU, model) is None
    with pytest.raises(ValueError, match="0 has quant type fp4"):
        choose_kernel("native", CPU, model)
    assert not use_nf4_kernel(model, "auto", CPU)
    assert not isinstance(model[0], NativeNf4Linear)


def test_cuda_and_bnb_mode_keep_bitsandbytes() -> None:
    model = nn.Sequential(_layer(128, 64))
    assert choose_kernel("bnb", CPU, model) is None
    with pytest.raises(ValueError, match="runs on the CPU, not cuda"):
        choose_kernel("native", torch.device("cuda"), model)
    with pytest.raises(ValueError, match="unknown NF4 kernel"):
        choose_kernel("fast", CPU, model)


def test_swapped_model_keeps_parameters_and_footprint(smollm2: ResolvedModel) -> None:
    model = load_base_model(smollm2, "nf4", "cpu")
    names = {name for name, _ in model.named_parameters()}
    footprint = model.get_memory_footprint()
    assert use_nf4_kernel(model, "native", CPU)
    assert not four_bit_layers(model)
    assert {name for name, _ in model.named_parameters()} == names
    assert model.get_memory_footprint() == footprint


def test_a_hooked_layer_is_refused() -> None:
    """The native layer replaces the module: hooks on the old one would silently not run."""
    model = nn.Sequential(_layer(128, 64))
    model[0].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="0 has hooks on the layer"):
        choose_kernel("native", CPU, model)
