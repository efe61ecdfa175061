"""What this CPU runs natively, and which precision `--precision auto` picks for each kind of CPU.

CPUs differ in the units they have for the two reduced precisions annotate offers: bf16 (a dot
product instruction in AVX512-BF16, tiles in AMX) and int8 (VNNI, AMX). `CPU_KINDS` is the table
`auto` reads, most capable kind first; each row names the result file its choice comes from
(benchmarks/results/). bf16 is close enough to fp32 to be any model's default where the CPU runs it
natively; int8 costs a little F1 that depends on the model, so `auto` runs it only for a model that
carries a passing check (`nerbatch.autoprecision`) and only where it measured faster than the
lossless choice.

No torch here: the Ray driver and the ranks' agreement on one precision read CPU features too.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

# Test hook (never set in production): a space-separated flag list read instead of /proc/cpuinfo's,
# so that tests can be any kind of CPU; "MODEL NAME|flags" sets the model name too. FLAGS_ENV + "_RANK1"
# (and so on) is rank 1's alone: ranks of one test on different kinds of CPU.
FLAGS_ENV = "NERBATCH_TEST_CPU_FLAGS"


def _mocked() -> str | None:
    return os.environ.get(f"{FLAGS_ENV}_RANK{os.environ.get('RANK', '')}") or os.environ.get(FLAGS_ENV) or None


@dataclass(frozen=True)
class CpuKind:
    """A kind of CPU by the flags it must have, and what `auto` runs on it."""

    name: str
    needs: frozenset[str]  # /proc/cpuinfo flags
    lossless: str  # the precision `auto` runs for any model: fp32, or bf16 where it is native
    int8: bool  # whether `auto` runs int8 for a model whose int8 check passed (measured faster here)
    bf16_kernel: str | None  # the unit bf16 runs on (recorded with the choice)
    int8_kernel: str  # the unit int8 runs on
    measured: str  # the result file behind the row


CPU_KINDS = (
    # Intel Sapphire Rapids and later. bf16 measured 1.61x fp32 and int8 (fbgemm, which has no
    # AMX path) 1.3x fp32 there: bf16 is the faster one, so int8 is never `auto`'s pick.
    CpuKind(
        "amx",
        frozenset({"amx_tile", "amx_bf16", "amx_int8", "avx512_bf16"}),
        lossless="bf16",
        int8=False,
        bf16_kernel="oneDNN AMX-BF16",
        int8_kernel="fbgemm AVX512-VNNI",
        measured="issue 26 (2-core Xeon, AMX); cpu-precision-amx.json still to be run",
    ),
    # AMD Zen 4 and later, Intel Cooper Lake: bf16 dot products, int8 VNNI.
    CpuKind(
        "avx512-bf16",
        frozenset({"avx512_bf16", "avx512_vnni", "avx512bw"}),
        lossless="bf16",
        int8=True,
        bf16_kernel="oneDNN AVX512-BF16",
        int8_kernel="fbgemm AVX512-VNNI",
        measured="cpu-precision-lanes-epyc-zen4.json",
    ),
    # Intel Cascade Lake / Ice Lake: int8 VNNI, no bf16 arithmetic.
    CpuKind(
        "avx512-vnni",
        frozenset({"avx512_vnni", "avx512bw"}),
        lossless="fp32",
        int8=True,
        bf16_kernel=None,
        int8_kernel="fbgemm AVX512-VNNI",
        measured="the avx512-bf16 row's int8 (same kernels)",
    ),
    # AMD Zen 2/3, older Xeons: int8 through AVX2 integer multiply-adds, 2.5x fp32.
    CpuKind(
        "avx2",
        frozenset({"avx2", "fma"}),
        lossless="fp32",
        int8=True,
        bf16_kernel=None,
        int8_kernel="fbgemm AVX2",
        measured="processes-800-docs-epyc.json",
    ),
)
# Anything else (other architectures, pre-AVX2 x86): fp32, and int8 only when asked for.
OTHER = CpuKind("other", frozenset(), "fp32", False, None, "fbgemm/qnnpack reference", measured="-")


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere, which reads as `other`)."""
    mocked = _mocked()
    if mocked:
        return frozenset(mocked.rpartition("|")[2].split())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """This CPU's model name, as /proc/cpuinfo gives it (the platform's processor string elsewhere)."""
    mocked = _mocked()
    if mocked and "|" in mocked:
        return mocked.partition("|")[0]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_kind(flags: frozenset[str] | None = None) -> CpuKind:
    """The first row of `CPU_KINDS` whose flags `flags` (default: this CPU's) all has."""
    flags = cpu_flags() if flags is None else flags
    return next((kind for kind in CPU_KINDS if kind.needs <= flags), OTHER)


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes in bf16 (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower than fp32."""
    return cpu_kind(flags).bf16_kernel is not None


def describe_cpu() -> str:
    """This CPU in one line: model, logical cores, kind and the flags that decide it."""
    relevant = sorted(cpu_flags() & {flag for kind in CPU_KINDS for flag in kind.needs})
    return f"{cpu_model()}, {os.cpu_count()} logical cores, kind {cpu_kind().name} ({' '.join(relevant) or 'none'})"
