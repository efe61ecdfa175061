"""Build benchmarks/gpu/carry/, the folder the GPU machine receives beside the checkout (64 MiB at most).

    .venv/bin/python benchmarks/gpu/prepare.py [MODEL_DIR]      (default runs/minilm-conll2003-document)

It holds what the GPU machine lacks and cannot fetch (it has no network):

    seqeval-1.2.2-py3-none-any.whl   nerbatch.evaluation imports seqeval; PyPI has only its sdist
    conll2003/train.txt, valid.txt   copied from the shared data
    reuters.parquet                  the first non-blank Reuters-21578 bodies (doc_id, text)
    minilm/                          the fine-tuned model with bf16 weights (fp32 is ~90 MB, over
                                     the limit; the GPU run saves them as fp32 again), and its
                                     tokenizer, which the random bert-base-shaped model also uses
    manifest.json                    written last: what is here and where it came from

The size is checked; over 64 MiB is an error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LIMIT_BYTES = 64 * 2**20  # what the device tool carries, all files together
SEQEVAL = "seqeval==1.2.2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def build_seqeval_wheel(carry: Path) -> Path:
    """seqeval as a wheel (pure Python; it needs numpy and scikit-learn, both on the GPU machine)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", SEQEVAL, "-w", str(carry)], check=True
    )
    return next(carry.glob("seqeval-*.whl"))


def copy_conll(data: Path, carry: Path) -> Path:
    """CoNLL-2003 train and validation files, as they are."""
    target = carry / "conll2003"
    target.mkdir()
    for name in ("train.txt", "valid.txt"):
        shutil.copy(data / "conll2003" / name, target / name)
    return target


def write_reuters(data: Path, carry: Path, docs: int) -> Path:
    """The first `docs` non-blank Reuters bodies with their ids, zstd-compressed."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(data / "reuters21578" / "reuters21578.parquet", columns=["doc_id", "text"])
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(table["text"]), ""), True)
    target = carry / "reuters.parquet"
    pq.write_table(table.filter(pc.invert(blank)).slice(0, docs), target, compression="zstd")
    return target


def save_bf16_model(model_dir: Path, carry: Path) -> Path:
    """The model, checked as annotate checks it, saved with bf16 weights beside its tokenizer files."""
    import torch

    from nerbatch.modeling import load_token_classifier

    model, _ = load_token_classifier(str(model_dir), transformers_only=True)  # for save_pretrained
    target = carry / "minilm"
    model.to(torch.bfloat16).save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, target / name)
    return target


def folder_bytes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=False)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=lambda: os.environ.get("NERBATCH_SHARED_DATA", str(REPO.parent / "shared" / "data")),
    help="Folder holding conll2003/ and reuters21578/ [env NERBATCH_SHARED_DATA, else ../shared/data].",
)
@click.option("--docs", default=4000, show_default=True, help="Reuters documents to carry.")
@click.option("--carry", type=click.Path(path_type=Path), default=HERE / "carry", show_default=True)
def prepare(model_dir: Path | None, data: Path, docs: int, carry: Path) -> None:
    """Build the carry folder for benchmarks/gpu/run.sh from MODEL_DIR and the shared data."""
    model_dir = (model_dir or REPO / "runs" / "minilm-conll2003-document").resolve()
    if carry.exists():
        shutil.rmtree(carry)
    carry.mkdir(parents=True)
    wheel = build_seqeval_wheel(carry)
    copy_conll(data, carry)
    reuters = write_reuters(data, carry, docs)
    save_bf16_model(model_dir, carry)
    sizes = folder_bytes(carry)
    total = sum(sizes.values())
    manifest = {
        "model": str(model_dir),
        "data": str(data.resolve()),
        "reuters_docs": docs,
        "seqeval_wheel": wheel.name,
        "files": sizes,
        "total_bytes": total,
    }
    (carry / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for name, size in sizes.items():
        click.echo(f"{size / 2**20:8.2f} MiB  {name}")
    click.echo(f"{total / 2**20:8.2f} MiB  in {carry} (limit {LIMIT_BYTES / 2**20:.0f} MiB); Reuters: {reuters.name}")
    if total > LIMIT_BYTES:
        raise click.ClickException(
            f"{carry} holds {total / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB limit"
        )


if __name__ == "__main__":
    prepare()
