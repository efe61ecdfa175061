"""--precision auto on a CPU: chosen by the CPU's kind (flags mocked, so every kind is tested on any
machine) and by the model's precision record; printed, recorded, kept on resume, one for all ranks."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from nerbatch.autoprecision import (
    INT8_SCHEME,
    PRECISION_RECORD,
    TOLERANCE,
    agreed_flags,
    check_model,
    choose_precision,
    passing_check,
    read_record,
    warn_of_another_kernel,
)
from nerbatch.cli import main
from nerbatch.cpu import FLAGS_ENV, cpu_flags, cpu_kind, cpu_model
from nerbatch.errors import OptionError
from nerbatch.runconfig import model_fingerprint

from helpers import environment, nerbatch_command
from models import DEMO_DATA

# The flags that decide, as /proc/cpuinfo lists them on each kind of machine.
XEON_AMX = frozenset("avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8".split())
EPYC_ZEN4 = frozenset("avx2 fma avx512f avx512bw avx512_vnni avx512_bf16".split())
XEON_CASCADE = frozenset("avx2 fma avx512f avx512bw avx512_vnni".split())
EPYC_AVX2 = frozenset("avx2 fma sse4_2".split())
ARM = frozenset("fp asimd sve".split())


def record(loss: float = -0.0004, scheme: str = INT8_SCHEME) -> dict:
    """A precision record as `check_model` writes it, with an int8 check that lost `loss` F1."""
    check = {"passed": loss >= -TOLERANCE, "loss": loss, "scheme": scheme, "data": "valid.txt"}
    return {"checks": {"int8": check}}


def test_each_kind_of_cpu_is_told_apart_by_its_flags():
    assert [cpu_kind(f).name for f in (XEON_AMX, EPYC_ZEN4, XEON_CASCADE, EPYC_AVX2, ARM)] == [
        "amx",
        "avx512-bf16",
        "avx512-vnni",
        "avx2",
        "other",
    ]


@pytest.mark.parametrize(
    ("flags", "evidence", "expected"),
    [
        (XEON_AMX, None, "bf16"),  # bf16 is native: any model's default
        (XEON_AMX, record(), "bf16"),  # int8 measured slower than bf16 there
        (EPYC_ZEN4, None, "bf16"),
        (EPYC_ZEN4, record(), "int8"),
        (XEON_CASCADE, record(), "int8"),
        (EPYC_AVX2, None, "fp32"),  # no bf16 unit; int8 only with evidence
        (EPYC_AVX2, record(), "int8"),
        (EPYC_AVX2, record(loss=-0.0035), "fp32"),  # a check that lost too much
        (EPYC_AVX2, record(scheme="pc-other"), "fp32"),  # a check of another int8 scheme
        (ARM, record(), "fp32"),
    ],
)
def test_auto_on_cpu_follows_the_table_and_the_models_check(flags, evidence, expected):
    choice = choose_precision("auto", "cpu", flags=flags, evidence=evidence)
    assert choice.precision == expected and choice.cpu == cpu_kind(flags).name
    assert choice.reason and choice.kernel and choice.requested == "auto"


def test_the_reason_says_what_would_change_the_choice():
    assert "no int8 check" in choose_precision("auto", "cpu", flags=EPYC_AVX2, evidence={}).reason
    assert "lost 0.0035" in choose_precision("auto", "cpu", flags=EPYC_AVX2, evidence=record(-0.0035)).reason
    assert "check passed (F1 -0.0004" in choose_precision("auto", "cpu", flags=EPYC_AVX2, evidence=record()).reason
    assert choose_precision("auto", "cpu", flags=EPYC_ZEN4, evidence=record()).kernel == "fbgemm AVX512-VNNI"
    assert choose_precision("auto", "cpu", flags=XEON_AMX).kernel == "oneDNN AMX-BF16"


def test_gpu_and_explicit_choices():
    assert choose_precision("auto", "cuda", flags=EPYC_AVX2, evidence=record()).precision == "fp16"
    with pytest.raises(OptionError, match="int8 is for CPUs"):
        choose_precision("int8", "cuda")
    with pytest.raises(OptionError, match="fp16 needs a GPU"):
        choose_precision("fp16", "cpu", flags=XEON_AMX)
    assert choose_precision("int8", "cpu", flags=XEON_AMX).precision == "int8"  # asked for: no check needed
    assert choose_precision("fp32", "cpu", flags=EPYC_ZEN4).reason == "asked for"


def test_bf16_asked_for_on_a_cpu_without_bf16_runs_with_a_warning(capsys):
    choice = choose_precision("bf16", "cpu", flags=EPYC_AVX2)
    assert choice.precision == "bf16" and "emulated" in choice.kernel
    assert "without bf16 units (avx2)" in capsys.readouterr().err


def test_a_rerun_keeps_the_recorded_precision_where_this_cpu_runs_it():
    # written at int8 on an EPYC; requeued on an AMX Xeon, where auto alone would be bf16
    kept = choose_precision("auto", "cpu", flags=XEON_AMX, evidence=record(), previous="int8")
    assert kept.precision == "int8" and "written at int8" in kept.reason
    assert choose_precision("auto", "cpu", flags=EPYC_ZEN4, previous="fp32").precision == "fp32"
    # written at bf16 on an AMX Xeon; requeued on an AVX2 EPYC, which has no bf16 unit
    with pytest.raises(OptionError, match="written at bf16.*pass --precision bf16"):
        choose_precision("auto", "cpu", flags=EPYC_AVX2, previous="bf16")
    with pytest.raises(OptionError, match="fp16 on a GPU"):
        choose_precision("auto", "cpu", flags=XEON_AMX, previous="fp16")


def test_a_rerun_on_another_kernel_is_told_so(capsys):
    written = choose_precision("int8", "cpu", flags=EPYC_AVX2).record()
    warn_of_another_kernel(written, choose_precision("int8", "cpu", flags=EPYC_AVX2))
    warn_of_another_kernel(None, choose_precision("int8", "cpu", flags=EPYC_ZEN4))
    fp32 = choose_precision("fp32", "cpu", flags=EPYC_AVX2).record()
    warn_of_another_kernel(fp32 | {"kernel": "CUDA"}, choose_precision("fp32", "cpu", flags=EPYC_ZEN4))
    assert capsys.readouterr().err == ""
    warn_of_another_kernel(written, choose_precision("int8", "cpu", flags=EPYC_ZEN4))
    assert "ran int8 on fbgemm AVX2 (avx2), these run on fbgemm AVX512-VNNI (avx512-bf16)" in capsys.readouterr().err


def test_workers_on_different_cpus_agree_on_what_all_of_them_run():
    shared = agreed_flags([sorted(XEON_AMX), sorted(EPYC_ZEN4), sorted(EPYC_AVX2)])
    assert cpu_kind(shared).name == "avx2"
    assert choose_precision("auto", "cpu", flags=agreed_flags([XEON_AMX, EPYC_ZEN4])).precision == "bf16"


def test_flags_and_model_name_come_from_proc_cpuinfo_unless_mocked(monkeypatch):
    monkeypatch.setenv(FLAGS_ENV, "Mock Xeon|" + " ".join(sorted(XEON_AMX)))
    assert cpu_flags() == XEON_AMX and cpu_model() == "Mock Xeon"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(FLAGS_ENV + "_RANK1", " ".join(EPYC_AVX2))
    assert cpu_kind().name == "avx2"
    monkeypatch.delenv(FLAGS_ENV)
    monkeypatch.delenv(FLAGS_ENV + "_RANK1")
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    line = next((x for x in text.splitlines() if x.startswith(("flags", "Features"))), None)
    assert cpu_flags() == (frozenset(line.partition(":")[2].split()) if line else frozenset())


def test_a_record_holds_only_for_the_weights_it_was_written_for(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / PRECISION_RECORD).write_text(json.dumps({**record(), "model_fingerprint": model_fingerprint(str(model))}))
    assert passing_check(read_record(str(model)), "int8")
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # other weights, same size
    assert read_record(str(model)) is None
    assert choose_precision("auto", "cpu", model=str(model), flags=EPYC_AVX2).precision == "fp32"


def test_check_model_scores_both_levels_and_records_the_result(tuned_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tuned_model_dir, model)
    record_ = check_model(str(model), str(DEMO_DATA / "valid.conll"), ["int8"])
    check = record_["checks"]["int8"]
    assert check["levels"] == ["sentence", "document"] and check["scheme"] == INT8_SCHEME
    losses = [check["f1"][level]["int8"] - check["f1"][level]["fp32"] for level in check["levels"]]
    assert check["loss"] == pytest.approx(min(losses), abs=1e-6) and check["passed"] == (check["loss"] >= -TOLERANCE)
    assert check["f1"]["document"]["fp32"] > 0.1  # a real score of the tuned model, not a placeholder
    assert read_record(str(model)) == record_  # bound to these weights
    # the record makes auto run int8 where int8 is the faster, and evaluate report what annotate runs
    assert choose_precision("auto", "cpu", model=str(model), flags=EPYC_AVX2).precision == (
        "int8" if check["passed"] else "fp32"
    )


def annotate_args(model, source, out, *extra) -> list[str]:
    return ["annotate", str(model), str(source), "--output", str(out), "--id-column", "id", "--no-progress", *extra]


def test_annotate_prints_and_records_its_choice_and_a_requeue_keeps_it(tuned_model_dir, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tuned_model_dir, model)
    (model / PRECISION_RECORD).write_text(json.dumps({**record(), "model_fingerprint": model_fingerprint(str(model))}))
    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["Angela Merkel met Joe Biden in Berlin .", "It rained ."]}), source)
    out = tmp_path / "out"
    monkeypatch.setenv(FLAGS_ENV, " ".join(EPYC_AVX2))
    first = CliRunner().invoke(main, annotate_args(model, source, out))
    assert first.exit_code == 0, first.output
    assert "precision int8 (fbgemm AVX2): the model's int8 check passed" in first.output
    meta = pq.read_metadata(next(out.glob("part-*.parquet"))).metadata
    assert json.loads(meta[b"nerbatch.options"])["precision"] == "int8"
    choice = json.loads(meta[b"nerbatch.precision_choice"])
    assert choice["precision"] == "int8" and choice["cpu"] == "avx2" and choice["kernel"] == "fbgemm AVX2"
    rows = pq.read_table(out).to_pylist()
    # requeued onto an AMX Xeon: auto alone would be bf16 there, the rerun keeps int8 and resumes, and
    # says that its int8 runs on another kernel than the pieces already written
    monkeypatch.setenv(FLAGS_ENV, " ".join(XEON_AMX))
    again = CliRunner().invoke(main, annotate_args(model, source, out))
    assert again.exit_code == 0 and "written at int8" in again.output
    assert "earlier pieces ran int8 on fbgemm AVX2 (avx2), these run on fbgemm AVX512-VNNI (amx)" in again.output
    assert pq.read_table(out).to_pylist() == rows
    # an output of 0.4.0 (no precision_choice in its config) resumes the same way, with no kernel to compare
    config = out / "_nerbatch" / "config.json"
    older = json.loads(config.read_text())
    del older["precision_choice"]
    config.write_text(json.dumps(older))
    again = CliRunner().invoke(main, annotate_args(model, source, out))
    assert again.exit_code == 0 and "written at int8" in again.output and "earlier pieces" not in again.output
    assert pq.read_table(out).to_pylist() == rows
    # a run written at bf16, requeued on a CPU without bf16: refused before any work, saying what to pass
    bf16_out = tmp_path / "bf16"
    assert CliRunner().invoke(main, annotate_args(model, source, bf16_out, "--precision", "bf16")).exit_code == 0
    monkeypatch.setenv(FLAGS_ENV, " ".join(EPYC_AVX2))
    refused = CliRunner().invoke(main, annotate_args(model, source, bf16_out))
    assert refused.exit_code == 1 and "pass --precision bf16" in refused.output


@pytest.mark.slow
def test_ranks_on_different_cpus_run_one_precision(tuned_model_dir, tmp_path):
    """Rank 0 on an AMX Xeon (auto alone: bf16), rank 1 on an AVX2 EPYC (auto alone: fp32): the run
    resolves one precision before any work, the one both run natively."""
    import subprocess

    source = tmp_path / "docs.parquet"
    texts = [f"Angela Merkel met Joe Biden in Berlin on day {i} ." for i in range(40)]
    pq.write_table(pa.table({"id": list(range(40)), "text": texts}), source, row_group_size=10)
    out = tmp_path / "out"
    env = environment(**{FLAGS_ENV + "_RANK0": " ".join(XEON_AMX), FLAGS_ENV + "_RANK1": " ".join(EPYC_AVX2)})
    command = nerbatch_command(annotate_args(tuned_model_dir, source, out), processes=2)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("nerbatch annotate: precision fp32") == 1
    stats = sorted((out / "_nerbatch" / "stats").glob("rank-*.json"))
    assert len(stats) == 2  # two ranks really ran
    meta = pq.read_metadata(next(out.glob("part-*.parquet"))).metadata
    assert json.loads(meta[b"nerbatch.options"])["precision"] == "fp32"
    assert json.loads(meta[b"nerbatch.precision_choice"])["cpu"] == "avx2"


@pytest.mark.slow
def test_train_records_the_int8_check_of_its_best_model(tiny_model_dir, tmp_path):
    from helpers import run

    out = tmp_path / "run"
    run(["train", "--model", str(tiny_model_dir), "--train", str(DEMO_DATA / "train.conll"),
         "--validation", str(DEMO_DATA / "valid.conll"), "--output-dir", str(out), "--epochs", "1"])  # fmt: skip
    check = json.loads((out / PRECISION_RECORD).read_text())["checks"]["int8"]
    assert check["levels"] == ["sentence", "document"] and check["scheme"] == INT8_SCHEME
    metrics = json.loads((out / "metrics.json").read_text())["epochs"][0]
    assert check["f1"]["sentence"]["fp32"] == pytest.approx(metrics["overall_f1"], abs=1e-6)  # same model, same data
    assert read_record(str(out))  # for the saved best model's weights
