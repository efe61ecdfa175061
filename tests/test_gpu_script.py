"""The GPU benchmark's dry run (benchmarks/gpu/run.sh --dry-run) as a real process: every step runs
on the CPU at tiny sizes and records real figures, so the script is proven before a GPU is lent."""

import json
import subprocess
import sys

import pytest

from conftest import CONLL, REPO, REUTERS, need
from helpers import environment

pytestmark = pytest.mark.slow
SECTIONS = ("machine", "tests", "training", "annotation", "cpu_gpu_spans", "targets")
TARGETS = {
    "annotate_over_pipeline_best",
    "annotate_over_ceiling",
    "annotate_subwords_per_s",
    "training_speedup",
    "cpu_gpu_identical_docs",
}


def errors(section: dict, where: str) -> list[str]:
    """Every `error` recorded anywhere in a section, with where it was."""
    found = [f"{where}: {section['error']}"] if "error" in section else []
    for key, value in section.items():
        if isinstance(value, dict):
            found += errors(value, f"{where}/{key}")
    return found


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """gpu.json of one dry run (the carry folder if prepared, else models built from the shared data)."""
    need(CONLL / "train.txt")
    need(REUTERS)
    out = tmp_path_factory.mktemp("gpu-dry-run")
    done = subprocess.run(
        [str(REPO / "benchmarks" / "gpu" / "run.sh"), "--dry-run"],
        env=environment(OUT=str(out), PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((out / "gpu.json").read_text()) if (out / "gpu.json").exists() else {}
    recorded = [e for name in SECTIONS for e in errors(report.get(name, {}), name)]
    assert done.returncode == 0, "\n".join(recorded) or done.stdout[-4000:] + done.stderr[-2000:]
    assert (out / "run.log").exists() and (out / "tests.xml").exists()
    return report


def test_every_section_is_there_without_error(dry_run):
    assert dry_run["dry_run"] is True
    assert dry_run["machine"]["gpu"] is None  # CUDA hidden: the dry run is the CPU's
    for name in SECTIONS:
        assert name in dry_run, name
        assert not errors(dry_run[name], name)
    assert dry_run["elapsed_s"] < dry_run["budget_s"]


def test_the_cuda_tests_ran_on_the_cpu_and_passed(dry_run):
    tests = dry_run["tests"]
    assert tests["device"] == "cpu" and tests["exit_code"] == 0
    assert tests["passed"] > 0 and tests["failed"] == 0 and tests["skipped"] == 0
    assert {case["outcome"] for case in tests["cases"]} == {"passed"}


def test_both_training_loops_report_their_speed(dry_run):
    training = dry_run["training"]
    assert training["nerbatch"]["sentences_per_s"] > 0 and training["reference"]["sentences_per_s"] > 0
    assert training["nerbatch"]["steps"] < training["reference"]["steps"]  # batch 32 against batch 8
    assert training["speedup"] == pytest.approx(
        training["nerbatch"]["sentences_per_s"] / training["reference"]["sentences_per_s"]
    )


@pytest.mark.parametrize("model", ["bert_base_random", "minilm_tuned"])
def test_annotate_pipeline_and_ceiling_are_timed_for_each_model(dry_run, model):
    entry = dry_run["annotation"][model]
    ours = entry["annotate"]["like_pipeline"]
    assert ours["docs"] == entry["pool_docs"] * entry["copies"]
    assert ours["subwords"] == entry["pool_subwords"] * entry["copies"]
    assert ours["docs_per_s"] > 0 and ours["steady"]["docs_per_s"] > 0
    assert ours["steady"]["docs"] == entry["pool_docs"] * (entry["copies"] - 1)  # all units but the first
    assert set(entry["pipeline"]["by_batch_size"]) == {"1", "8"}
    assert all(run["docs_per_s"] > 0 for run in entry["pipeline"]["by_batch_size"].values())
    assert entry["ceiling"]["docs_per_s"] > 0 and entry["ceiling"]["docs"] == entry["pool_docs"]
    assert entry["ratios"]["annotate_over_ceiling"] > 0


def test_cpu_and_device_spans_are_compared(dry_run):
    spans = dry_run["cpu_gpu_spans"]
    assert spans["docs"] > 0 and 0 <= spans["fraction_identical"] <= 1
    # a dry run compares fp32 on the CPU with fp32 on the CPU: the very same spans
    assert spans["device_precision"] == "fp32" and spans["fraction_identical"] == 1
    assert spans["spans_cpu"] == spans["spans_device"] == spans["spans_in_both"] > 0


def test_every_target_is_checked(dry_run):
    assert set(dry_run["targets"]) == TARGETS
    assert all(isinstance(t["met"], bool) and t["value"] is not None for t in dry_run["targets"].values())


def test_processes_sharing_the_device_annotate_n_times_the_corpus(dry_run):
    entry = dry_run["annotation"]["bert_base_random"]
    shared = entry["annotate"]["like_pipeline_2proc"]
    assert shared["processes"] == 2 and shared["docs"] == 2 * entry["pool_docs"] * entry["copies"]
    assert shared["steady"]["subwords_per_s"] > 0 and shared["process_subwords_per_s"] > 0
    # --engine ray with its defaults: one actor per core of this CPU, units on demand, the same corpus
    ray = entry["annotate"]["like_pipeline_ray2"]
    assert ray["processes"] == 2 and ray["docs"] == shared["docs"] and ray["subwords"] == shared["subwords"]
    assert ray["steady"]["subwords_per_s"] > 0 and ray["process_subwords_per_s"] > 0
    best = entry["ratios"]["run"]
    assert best in ("like_pipeline", "like_pipeline_2proc", "like_pipeline_ray2")
    assert entry["ratios"]["annotate_subwords_per_s"] == entry["annotate"][best]["steady"]["subwords_per_s"]


def test_the_training_profile_says_where_a_step_goes(dry_run):
    profile = dry_run["training"]["profile"]
    assert profile["ms_per_step_bf16"] > 0 and profile["ms_per_step_fp32"] > 0
    assert profile["cpu_ops_ms_per_step"] > 0 and len(profile["top_cpu_ops"]) > 5


def test_one_annotate_process_is_profiled(dry_run):
    entry = dry_run["annotation"]["bert_base_random"]
    profile = entry["profile"]
    assert profile["docs"] == entry["pool_docs"] * entry["copies"] and profile["job_seconds"] > 0
    functions = [row["function"] for row in profile["by_cumulative_time"]]
    assert any("annotate_unit" in f for f in functions)  # the job's own code is in the ranking
    assert all(row["own_us_per_doc"] >= 0 for row in profile["by_own_time"])


def marker(rank: int, at: float, seconds: float, tokens: int, pid: int = 1) -> dict:
    return {"rank": rank, "pid": pid, "at": at, "seconds": seconds, "docs": tokens // 10, "tokens": tokens}


def test_the_steady_window_counts_only_the_time_every_rank_was_past_its_first_unit():
    from benchmarks.gpu.gpu_bench import steady_rate

    # rank 0: units done at 10 (first), 14, 18; rank 1 started late: 12 (first), 16, 20.
    # The window is [12, 18]: rank 0's unit 10-14 counts half, 14-18 whole; rank 1's 12-16 whole,
    # 16-20 half.
    markers = [marker(0, 10, 10, 999), marker(0, 14, 4, 400), marker(0, 18, 4, 400)]
    markers += [marker(1, 12, 12, 999), marker(1, 16, 4, 800), marker(1, 20, 4, 800)]
    steady = steady_rate(markers)
    assert steady["seconds"] == 6 and steady["subwords"] == 200 + 400 + 800 + 400
    assert steady["subwords_per_s"] == pytest.approx(1800 / 6)
    # one rank alone: its units after the first
    alone = steady_rate(markers[:3])
    assert (alone["seconds"], alone["subwords"]) == (8, 800)
    # a rank done before another finished its first unit: no window, said so
    assert "error" in steady_rate([marker(0, 5, 5, 1), marker(0, 6, 1, 1), marker(1, 9, 9, 1), marker(1, 10, 1, 1)])
    # processes are told apart by pid as well as rank (a rerun's rank 0 is another process)
    workers = [{**m, "rank": 0, "pid": 100 + m["rank"]} for m in markers]
    assert steady_rate(workers) == steady
    # a worker that started late and did one unit (12-20): the window is the others' [10, 18], where
    # it ran 6 of its 8 seconds
    late = [{**m, "pid": 100} for m in markers[:3]] + [marker(0, 20, 8, 800, pid=101)]
    steady = steady_rate(late)
    assert steady["seconds"] == 8 and steady["subwords"] == 800 + 600 and "single unit" in steady["note"]


def test_set_overrides_a_size_and_refuses_what_it_cannot_mean():
    from benchmarks.gpu.gpu_bench import BENCHMARK
    from benchmarks.gpu.runner import chosen_sizes, parse_args

    def sizes(*settings):
        argv = ["--out", "/tmp/unused", *(a for s in settings for a in ("--set", s))]
        return chosen_sizes(BENCHMARK, parse_args(BENCHMARK, argv))

    chosen = sizes('steps=["annotation"]', 'tests="share_one_device"', "train_profile=false", "budget_s=300")
    assert (chosen.steps, chosen.tests, chosen.train_profile, chosen.budget_s) == (
        ("annotation",),
        "share_one_device",
        False,
        300,
    )
    assert chosen.annotate_runs == sizes().annotate_runs  # the rest as it was
    for wrong, said in [
        ('steps=["annotate"]', "no step called annotate"),
        ('steps="annotation"', "steps takes a tuple"),
        ("tests=share", "not JSON"),
        ("budget=1", "no size called 'budget'"),
    ]:
        with pytest.raises(SystemExit, match=said):
            sizes(wrong)
