"""Numeric precision of inference: fp32, bf16/fp16 autocast, or int8 weights on CPU.

`auto` is fp16 autocast on a GPU and fp32 on CPU. fp16 rather than bf16: the two run at the same
speed on a GPU, and fp16's three extra mantissa bits keep more documents' spans identical to fp32's
(benchmarks/README.md). fp16's range ends at 65,504, so a batch whose outputs
are not all finite is run again in fp32 (`AutocastWithFallback`, `Tagger.collect`). `int8` quantizes the
Linear layers' weights to int8, one scale per output channel, with dynamic int8 activations over
their full 8-bit range (`torch.ao.quantization.quantize_dynamic`, fbgemm kernels on x86: the
quantization path that ships inside torch, needs no extra dependency and no data from the user).
Two places carry most of the error and are treated apart: the classifier stays in fp32, and the
first feed-forward down-projection, whose input (a GELU output) has a few channels with several
times the range of the rest, computes those channels in fp32 and the others in int8. The channels
are found once, by running the shipped demo sentences through the first layer. The measurements
behind each choice are in benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from importlib import resources

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from nerbatch.autoprecision import INT8_SCHEME
from nerbatch.errors import NerbatchError, OptionError


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision for `device`; combinations that cannot work are a one-line error.

    `auto` here is the reference that does not depend on the CPU: fp16 on a GPU, fp32 on CPU (what
    training validates in, so the best epoch is the same on every machine). The commands' `auto`
    goes through `nerbatch.autoprecision`, which picks by the CPU and the model."""
    on_gpu = device.type == "cuda"
    if precision == "auto":
        return "fp16" if on_gpu else "fp32"
    if precision == "int8" and on_gpu:
        raise OptionError("--precision int8 is for CPUs (fbgemm kernels); on a GPU use bf16 or fp16 (or auto)")
    if precision == "fp16" and not on_gpu:
        raise OptionError("--precision fp16 needs a GPU; on a CPU use fp32, bf16 or int8")
    return precision


def autocast_dtype(precision: str, device_type: str = "cuda") -> torch.dtype | None:
    """The dtype to autocast the forward pass to, None for fp32 and int8, and for bf16 on CPU, which
    runs a model cast to bf16 once (`cast_bf16`)."""
    if precision == "bf16" and device_type == "cpu":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def cast_bf16(model, inplace: bool = False):
    """`model` (a copy unless `inplace`) in bf16 for a CPU, its classifier head kept in fp32.

    Cast once rather than autocast: on CPU, autocast casts every Linear's input and weight to bf16
    at each call and the rest of the layer back to fp32; the cast model's forward pass is faster
    (benchmarks/README.md) at the same validation F1. The head stays fp32 (its input is cast up) so
    that logits and scores keep fp32's resolution."""
    model = (model if inplace else copy.deepcopy(model)).eval().to(torch.bfloat16)
    head = classifier_head(model)
    if head is not None:
        head.float()
        head.register_forward_pre_hook(lambda _, args: tuple(a.float() for a in args))
    return model


def classifier_head(model) -> torch.nn.Linear | None:
    """The last Linear of a token classifier whose outputs are its labels, or None."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == model.config.num_labels]
    return heads[-1] if heads else None


def is_bf16_cast(model) -> bool:
    """Whether `model` went through `cast_bf16` (its weights are bf16)."""
    return next(model.parameters()).dtype == torch.bfloat16


class AutocastWithFallback(torch.nn.Module):
    """`model` under `dtype` autocast; a batch whose logits are not all finite (fp16 overflows past
    65,504) runs again in fp32, so an overflow never becomes silently wrong labels. `fallbacks`
    counts those batches. The check waits for each batch: for evaluation loops, which wait anyway
    (the annotate job checks its batches after their copy back instead, `Tagger.collect`)."""

    def __init__(self, model, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype, self.fallbacks = model, dtype, 0

    def forward(self, **inputs):
        device = next(self.model.parameters()).device.type
        with torch.autocast(device, dtype=self.dtype):
            output = self.model(**inputs)
        if torch.isfinite(output.logits).all():
            return output
        self.fallbacks += 1
        with torch.autocast(device, enabled=False):  # fp32 even inside a caller's autocast block
            output = self.model(**inputs)
        if not torch.isfinite(output.logits).all():
            raise NerbatchError("the model's outputs are not finite even in fp32: its weights may hold NaN or inf")
        return output


# Calibration text for int8: our own sentences, shipped with the package (nerbatch/demo_data).
CALIBRATION_TEXT = resources.files("nerbatch") / "demo_data" / "train.conll"
CALIBRATION_SENTENCES = 128
OUTLIER_CHANNELS = 8  # input channels of the down-projection kept in fp32: the few with outlying ranges
# The scheme, as named by benchmarks/int8_variants.py; recorded in run configs and output metadata.
if f"pc-split{OUTLIER_CHANNELS}-full" != INT8_SCHEME:  # one name for one scheme, in both modules
    raise ImportError("nerbatch.autoprecision.INT8_SCHEME must name nerbatch.precision's int8 scheme")


def first_down_projection(model) -> str | None:
    """The name of the first Linear whose input is wider than its output (the first feed-forward
    down-projection of a transformer encoder), or None."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.in_features > module.out_features:
            return name
    return None


def quantize_int8(model, tokenizer, inplace: bool = False):
    """`model` (a copy unless `inplace`) with int8 Linear weights (per-channel scales) and dynamic
    int8 activations over their full 8-bit range; the classifier stays fp32 and the first
    down-projection is split into fp32 outlier channels and int8 for the rest (`tokenizer` feeds
    its calibration)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = (model if inplace else copy.deepcopy(model)).eval()
    split_first_down_projection(model, tokenizer, OUTLIER_CHANNELS)
    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "classifier"
    }
    if not spec:
        raise OptionError(f"--precision int8: {type(model).__name__} has no Linear layers to quantize")
    with warnings.catch_warnings():  # torch marks these APIs deprecated in favour of torchao; they still work
        warnings.simplefilter("ignore")
        return quantize_dynamic(  # in place: `model` is ours by now
            model, spec, dtype=torch.qint8, mapping={torch.nn.Linear: _FullRangeLinear}, inplace=True
        )


def split_first_down_projection(model, tokenizer, k: int) -> None:
    """Replace, in place, the first down-projection of `model` by an `OutlierSplitLinear` keeping its
    `k` widest input channels (calibrated on the shipped sentences) apart; no-op without one."""
    wide = first_down_projection(model)
    if wide is None:
        return
    ranges = input_ranges(model, wide, calibration_batches(tokenizer))
    parent, _, child = wide.rpartition(".")
    setattr(model.get_submodule(parent), child, OutlierSplitLinear(model.get_submodule(wide), ranges, k))


def calibration_batches(tokenizer, batch_size: int = 32) -> list[dict]:
    """The shipped calibration sentences, tokenized as the model's input in padded batches (by the
    Rust tokenizer alone, so that any fast tokenizer will do)."""
    from tokenizers import Tokenizer

    from nerbatch.data import read_conll

    with resources.as_file(CALIBRATION_TEXT) as path:
        sentences = [s.words for s in read_conll(path).sentences[:CALIBRATION_SENTENCES]]
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: padding is set below
    backend.no_truncation()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    backend.enable_padding(pad_id=pad_id)
    batches = []
    for i in range(0, len(sentences), batch_size):
        encodings = backend.encode_batch(sentences[i : i + batch_size], is_pretokenized=True)
        ids = torch.tensor([e.ids for e in encodings])
        mask = torch.tensor([e.attention_mask for e in encodings])
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


class _Captured(Exception):
    """Raised by the calibration hook: the rest of the forward pass is not needed."""


@torch.inference_mode()
def input_ranges(model, name: str, batches: list[dict]) -> torch.Tensor:
    """The largest absolute value each input channel of module `name` takes over `batches`; each
    forward pass stops at that module."""
    module = model.get_submodule(name)
    largest = torch.zeros(module.in_features)

    def capture(_, inputs):
        x = inputs[0].detach().float()
        torch.maximum(largest, x.abs().reshape(-1, x.shape[-1]).amax(0), out=largest)
        raise _Captured

    handle = module.register_forward_pre_hook(capture)
    try:
        for batch in batches:
            with contextlib.suppress(_Captured):
                model(**batch)
    finally:
        handle.remove()
    return largest


class OutlierSplitLinear(torch.nn.Module):
    """A Linear computed in two parts: its `k` input channels of widest range in fp32, the others
    through an int8 Linear (the decomposition of LLM.int8(), with the channels fixed by calibration).

    Dynamic quantization gives all channels of an activation one scale, set by the widest: a single
    channel with several times the range of the rest (as in MiniLM's first down-projection) costs
    the others bits. Zeroing the outliers before quantizing gives them back."""

    def __init__(self, linear: torch.nn.Linear, ranges: torch.Tensor, k: int):
        super().__init__()
        channels = ranges.argsort(descending=True)[: min(k, linear.in_features)].sort().values
        self.register_buffer("channels", channels)
        self.register_buffer("outlier_weight", linear.weight.detach()[:, channels].t().contiguous())
        self.rest = copy.deepcopy(linear)  # becomes the int8 part when the model is quantized
        with torch.no_grad():
            self.rest.weight[:, channels] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outliers = x.index_select(-1, self.channels) @ self.outlier_weight
        return self.rest(x.index_fill(-1, self.channels, 0.0)) + outliers


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
