"""Numeric precision of inference: fp32, bf16/fp16 autocast, or int8 weights on CPU.

`auto` is bf16 on a GPU that supports it (fp16 on older ones) and fp32 on CPU. `int8` quantizes the
Linear layers' weights to int8, one scale per output channel, with dynamic int8 activations over
their full 8-bit range (`torch.ao.quantization.quantize_dynamic`, fbgemm kernels on x86: the
quantization path that ships inside torch, needs no calibration data and no extra dependency),
except the layers that carry most of the error: the classifier, and the first encoder layer's
feed-forward down-projection (its GELU outputs have the widest range). The measurements behind each
choice are in the README (Precision).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from nerbatch.errors import OptionError


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision for `device`; combinations that cannot work are a one-line error."""
    on_gpu = device.type == "cuda"
    if precision == "auto":
        if on_gpu:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "int8" and on_gpu:
        raise OptionError("--precision int8 is for CPUs (fbgemm kernels); on a GPU use bf16 or fp16 (or auto)")
    if precision == "fp16" and not on_gpu:
        raise OptionError("--precision fp16 needs a GPU; on a CPU use fp32 or int8")
    if precision == "bf16" and not on_gpu and not _cpu_has_native_bf16():
        raise OptionError(
            "--precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 would be emulated "
            "and slower than fp32; use fp32 or int8"
        )
    return precision


def _cpu_has_native_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype to autocast the forward pass to, None for fp32 and int8."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def sensitive_linears(model) -> set[str]:
    """Names of the Linear layers int8 keeps in fp32: the classifier, and the first feed-forward
    down-projection (the first Linear whose input is wider than its output)."""
    keep = {"classifier"} if isinstance(getattr(model, "classifier", None), torch.nn.Linear) else set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.in_features > module.out_features:
            keep.add(name)
            break
    return keep


def quantize_int8(model):
    """A copy of `model` with int8 Linear weights (per-channel scales) and dynamic int8 activations
    over their full 8-bit range, the sensitive layers kept in fp32."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    keep = sensitive_linears(model)
    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in keep
    }
    if not spec:
        raise OptionError(f"--precision int8: {type(model).__name__} has no Linear layers to quantize")
    with warnings.catch_warnings():  # torch marks these APIs deprecated in favour of torchao; they still work
        warnings.simplefilter("ignore")
        return quantize_dynamic(
            copy.deepcopy(model).eval(), spec, dtype=torch.qint8, mapping={torch.nn.Linear: _FullRangeLinear}
        )


def is_quantized(model) -> bool:
    """Whether `model` already went through `quantize_int8` (or torch's dynamic quantization)."""
    return any(isinstance(m, DynamicLinear) for m in model.modules())


class _FullRangeLinear(DynamicLinear):
    """torch's dynamic int8 Linear, but quantizing activations to the full 8 bits.

    torch passes `reduce_range=True` (7-bit activations) so that the AVX2 kernels' pairwise int16
    sums can never saturate. Measured on CoNLL-2003 validation with two MiniLM models, the lost bit
    is most of int8's error (F1 -0.0009 to -0.0044 against fp32 with 7 bits, 0.0000 to -0.0015 with
    8), and saturation did not show; CPUs with VNNI have no such limit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
        return y.to(x.dtype)
