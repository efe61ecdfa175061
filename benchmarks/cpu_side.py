"""What annotate's CPU side costs, without a GPU: whole `nerbatch annotate` processes with a model
that has no encoder layers, so the forward pass is almost free and what is timed is the rest —
reading, tokenizing, planning windows, building batches, decoding spans, writing Parquet.

On a GPU that rest is what stands between annotate and the forward-only ceiling (README, GPU): one
process's CPU side has to keep up with the GPU. This measures it on any machine, and compares
checkouts side by side (`--other DIR`: another nerbatch source tree, e.g. a `git worktree` of an
older commit), in interleaved rounds.

    .venv/bin/python -m benchmarks.cpu_side --model runs/minilm-conll2003-document \\
        --reuters ../shared/data/reuters21578/reuters21578.parquet [--other /tmp/nerbatch-old]

The model directory only lends its tokenizer and labels. The no-layer model's head is calibrated,
as the GPU benchmark's random model is, to tag about 5% of the subwords, so decoding costs what it
costs with a trained model. Documents: the first `--docs` Reuters bodies that fit one 512-subword
window, `--copies` times over, one annotate unit per copy; `steady` is the units after the
first, in one process; `work` is from the first unit's start to the last one's end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.gpu.gpu_bench import build_random_encoder, reuters_texts, write_corpus

HERE = Path(__file__).resolve().parent

NO_LAYERS = {"hidden_size": 32, "num_hidden_layers": 0, "num_attention_heads": 2, "intermediate_size": 64}
LIKE_PIPELINE = ["--segment", "none", "--max-length", "512", "--aggregation", "simple"]


def cpu_name() -> str:
    """The CPU model, for the figures' label (they hold only on this CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_inputs(model: str, reuters: str, docs: int, copies: int, workdir: Path) -> tuple[Path, Path]:
    """The no-layer model and the corpus, in `workdir`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = [t for t in reuters_texts(reuters, docs * 2) if len(tokenizer(t)["input_ids"]) <= 512][:docs]
    encoder = build_random_encoder(Path(model), workdir / "no-layers", NO_LAYERS, texts[:64])
    return encoder, write_corpus(workdir / "corpus.parquet", texts, copies)


def time_process(source: Path, encoder: Path, corpus: Path, output: Path, options: list[str]) -> dict:
    """One `nerbatch annotate` process from the source tree `source`: steady and at-work docs/s."""
    env = {**os.environ, "PYTHONPATH": str(source), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "nerbatch", "annotate", str(encoder), str(corpus), "--output", str(output)]
    cmd += ["--id-column", "doc_id", "--no-progress", "--overwrite", *options]
    began = time.perf_counter()
    # run from the source tree: `-m` puts the working directory first on the path
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=source)
    process = time.perf_counter() - began
    stats = json.loads((output / "_nerbatch" / "stats.json").read_text())
    units = [json.loads(p.read_text()) for p in (output / "_nerbatch" / "done").glob("*.json")]
    # from the first unit's start to the last unit's end: the work, without start-up (a marker
    # holds its unit's end and duration)
    work = max(u["at"] for u in units) - min(u["at"] - u["seconds"] for u in units)
    # units after the first, their own durations added up (in one process, where they run in turn)
    later = sorted(units, key=lambda u: u["unit"]["index"])[1:]
    steady = sum(u["seconds"] for u in later)
    return {
        "docs": stats["docs"],
        "steady_docs_per_s": sum(u["docs"] for u in later) / steady,
        "steady_us_per_doc": 1e6 * steady / sum(u["docs"] for u in later),
        "work_docs_per_s": stats["docs"] / work,
        "work_us_per_doc": 1e6 * work / stats["docs"],
        "process_seconds": process,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A token classifier directory (tokenizer, labels).")
    parser.add_argument("--reuters", required=True, help="Reuters Parquet file (a `text` column).")
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--other", type=Path, help="Another nerbatch source tree, timed in the same rounds.")
    parser.add_argument(
        "--gpu-batches", action="store_true", help="The GPU's batch caps (1024 windows, 32768 subwords)."
    )
    parser.add_argument("--defaults", action="store_true", help="annotate's defaults instead of pipeline-like options.")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    options = [*([] if args.defaults else LIKE_PIPELINE)]
    options += ["--batch-size", "1024", "--max-batch-tokens", "32768"] if args.gpu_batches else []
    variants = {"this": (HERE.parent, options)}
    if args.other:
        variants["other"] = (args.other.resolve(), options)
    with tempfile.TemporaryDirectory(prefix="nerbatch-cpu-side-") as tmp:
        encoder, corpus = build_inputs(args.model, args.reuters, args.docs, args.copies, Path(tmp))
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (source, flags) in variants.items():
                runs[name].append(time_process(source, encoder, corpus, Path(tmp) / f"out-{name}", flags))
    best = {name: max(rounds, key=lambda r: r["work_docs_per_s"]) for name, rounds in runs.items()}
    report = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "options": options,
        "variants": {name: [str(source), *flags] for name, (source, flags) in variants.items()},
        "rounds": runs,
        "best": best,
    }
    print(f"{report['cpu']}, {report['cores']} cores; {' '.join(options) or 'defaults'}")
    for name, figures in best.items():
        print(
            f"  {name:8s} {figures['work_docs_per_s']:8,.0f} docs/s at work ({figures['work_us_per_doc']:.0f} us a "
            f"document), {figures['process_seconds']:.1f} s process"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
