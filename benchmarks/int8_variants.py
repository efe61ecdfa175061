"""The int8 design choices, measured: validation F1 of one model under variants of `quantize_int8`.

    python -m benchmarks.int8_variants MODEL_DIR ../shared/data/conll2003/valid.txt pc-keep1-full pt-keep1-7bit ...

A variant is `{pt|pc}-{keepN|splitK}-{7bit|full}`: per-tensor or per-channel weight scales; the
classifier kept in fp32 and with it either the first N feed-forward down-projections (`keepN`), or
the K widest input channels of the first one, calibrated on the shipped demo sentences (`splitK`,
the rest of it in int8); activations quantized to torch's default 7-bit range or the full 8 bits.
`nerbatch --precision int8` is `pc-split8-full` (it was `pc-keep1-full` in 0.3.0). Prints one JSON
line per variant with sentence- and document-level F1 (fp32 first, as `fp32`) and the best of three
timings of the forward pass over the validation documents (`forward_seconds`, in this process).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

import nerbatch.inference
import nerbatch.precision
from nerbatch.evaluation import evaluate_dir
from nerbatch.precision import split_first_down_projection


class SevenBitLinear(DynamicLinear):
    """torch's own dynamic Linear (7-bit activations), under a name that `is_quantized` recognises."""


def quantizer(variant: str):
    """A replacement for `nerbatch.precision.quantize_int8` implementing `variant`."""
    scales, keep, activations = variant.split("-")
    qconfig = per_channel_dynamic_qconfig if scales == "pc" else default_dynamic_qconfig
    layer = nerbatch.precision._FullRangeLinear if activations == "full" else SevenBitLinear

    def quantize(model, tokenizer):
        model = copy.deepcopy(model).eval()
        downs = [
            n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features > m.out_features
        ]
        if keep.startswith("split"):
            split_first_down_projection(model, tokenizer, int(keep.removeprefix("split")))
            kept = {"classifier"}
        else:
            kept = {"classifier", *downs[: int(keep.removeprefix("keep"))]}
        spec = {n: qconfig for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in kept}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, spec, dtype=torch.qint8, mapping={torch.nn.Linear: layer})

    return quantize


def scores(model_dir: str, data: str, precision: str) -> dict:
    return {
        level: round(
            evaluate_dir(model_dir, data, documents=level == "document", annotate_options={"precision": precision})[
                "overall_f1"
            ],
            4,
        )
        for level in ("sentence", "document")
    }


def forward_seconds(model_dir: str, data: str, precision: str, repeats: int = 3) -> float:
    """Best-of-`repeats` time of the annotate path's forward pass over the validation documents
    (the model's default windows), in this process: the speed side of a variant."""
    from nerbatch.data import read_conll
    from nerbatch.documents import build_documents
    from nerbatch.inference import Tagger
    from nerbatch.modeling import load_token_classifier

    model, tokenizer = load_token_classifier(model_dir)
    tagger = Tagger(model, tokenizer, precision=precision)
    docs = tagger.encode([d.text for d in build_documents(read_conll(data))])
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        tagger.forward(docs)
        best = min(best, time.perf_counter() - started)
    return round(best, 3)


def main() -> None:
    model_dir, data, *variants = sys.argv[1:]
    for variant in ["fp32", *variants]:
        precision = "fp32" if variant == "fp32" else "int8"
        if precision == "int8":  # both import sites: evaluation imports it at call time, inference at import
            nerbatch.precision.quantize_int8 = nerbatch.inference.quantize_int8 = quantizer(variant)
        result = {"model": model_dir, "variant": variant, **scores(model_dir, data, precision)}
        result["forward_seconds"] = forward_seconds(model_dir, data, precision)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
