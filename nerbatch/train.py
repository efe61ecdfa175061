"""Fine-tune a token classifier with Accelerate: one script for 1 CPU, 1 GPU, N GPUs or N nodes.

The run reads top to bottom in `train`: set up, load data, build loaders, (resume), loop over
epochs with evaluation and saving. Everything distributed goes through the `Accelerator`; the code
never reads a rank itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import DataCollatorForTokenClassification, get_linear_schedule_with_warmup

from nerbatch.align import Encoded, encode
from nerbatch.batching import make_loader
from nerbatch.config import ConfigError, TrainConfig
from nerbatch.context import document_features
from nerbatch.data import Corpus, build_label_list, check_labels, load_corpus
from nerbatch.dist import describe, make_accelerator, on_device
from nerbatch.documents import build_documents
from nerbatch.evaluation import eval_loader, evaluate_documents, evaluate_features
from nerbatch.inference import Tagger, special_tokens_around
from nerbatch.modeling import load_model, load_tokenizer, window_length

# Keys that may change between a checkpoint and its resumption without changing the run.
RESUMABLE_CHANGES = {
    "output_dir",
    "eval_batch_size",
    "checkpoint_every",
    "keep_checkpoints",
    "report_to",
    "micro_batch_tokens",  # the same gradients, in slices
}


def load_splits(cfg: TrainConfig) -> tuple[Corpus, Corpus]:
    """Read the training and validation corpora, truncated to the configured sample counts."""
    train = load_corpus(cfg.train, "train", cfg.tokens_column, cfg.tags_column, cfg.document_column)
    validation = load_corpus(cfg.validation, "validation", cfg.tokens_column, cfg.tags_column, cfg.document_column)
    if cfg.max_train_samples:
        train.sentences = train.sentences[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        validation.sentences = validation.sentences[: cfg.max_eval_samples]
    return train, validation


def selection_level(cfg: TrainConfig, validation: Corpus) -> str:
    """The validation score that picks the best epoch: the one matching how the model will be used
    (`document`, the annotate path, whenever the validation data has documents), or as configured."""
    if cfg.select_by == "document" and not validation.has_documents:
        raise ConfigError(f"select_by = document: {validation.no_documents_reason()}")
    if cfg.select_by == "auto":
        return "document" if validation.has_documents else "sentence"
    return cfg.select_by


def training_features(cfg: TrainConfig, tokenizer, corpus: Corpus, label2id: dict[str, int], max_length: int):
    """The encoded training set: one feature per sentence, plus document windows with context = document."""
    encoded = encode(tokenizer, corpus.sentences, label2id, max_length, cfg.label_all_subwords)
    if cfg.context == "document":
        if not corpus.has_documents:
            raise ConfigError(f"context = document needs documents: {corpus.no_documents_reason()}")
        prefix, suffix = special_tokens_around(tokenizer.backend_tokenizer)
        window = min(cfg.context_window, max_length)
        encoded = Encoded(
            document_features(encoded.features, corpus.sentences, len(prefix), len(suffix), window, cfg.seed),
            encoded.split_sentences,
            lone=len(encoded.features),
        )
    return encoded


def sentence_length_cap(tokenizer, corpus: Corpus, share: float = 1.0) -> int:
    """The length in subwords that `share` of the training sentences do not exceed (by default the
    longest): annotate's sentence view cuts longer segments (run-on text without line breaks) for
    this model, as they are outside what it learnt from. The 99th percentile cost F1 on validation
    documents joined by newlines, the longest sentence did not (benchmarks/README.md, segment cap)."""
    words = [s.words for s in corpus.sentences]
    encoded = tokenizer(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    lengths = sorted(len(ids) for ids in encoded)
    return max(1, lengths[min(len(lengths) - 1, int(share * len(lengths)))]) if lengths else 1


def score_documents(accelerator, model, tokenizer, cfg: TrainConfig, corpus: Corpus, documents: dict) -> dict:
    """Document-level validation scores under each way annotate may run this model (one sentence
    per window; for document-context models also running text in windows of the training length),
    on the documents rebuilt with each join in `documents` (`nerbatch.documents.JOINS`: sentences
    joined by newlines, as a tidy dump reads, and by spaces, as text extracted from HTML runs on).

    A segmentation is judged by its lower F1 over the joins (the text users feed in may be either);
    the best one is recorded in the model, so annotate defaults to it. Returns the record of the
    epoch's document scores: `segment`, the metrics of each join under it, and every F1.
    """
    unwrapped = accelerator.unwrap_model(model)
    segments = ["none", "sentences"] if cfg.context == "document" else ["sentences"]
    results = {}
    for segment in segments:
        tagger = Tagger(unwrapped, tokenizer, segment=segment)
        for join, rebuilt in documents.items():
            results[segment, join] = evaluate_documents(
                tagger, corpus, rebuilt, accelerator.process_index, accelerator.num_processes
            )
    lower = {s: min(results[s, join]["overall_f1"] for join in documents) for s in segments}
    best = max(segments, key=lambda s: lower[s])  # a tie keeps the first
    return {
        "segment": best,
        "newline": results[best, "newline"],
        "space": results[best, "space"],
        "f1": lower[best],
        "f1_by_segment_and_join": {f"{s}/{join}": r["overall_f1"] for (s, join), r in results.items()},
    }


# What the launcher sets for a distributed process: a check in a process of its own must not inherit it.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
LAUNCHER_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_", "MASTER_", "ROLE_", "GROUP_")


def check_int8(accelerator, cfg: TrainConfig) -> None:
    """The best model's int8 check (`nerbatch check-precision`), recorded beside its weights so that
    annotate's `--precision auto` may run it at int8. It runs on CPU in a process of its own, started
    by the main process (the training processes hold the GPUs and the process group); a check that
    fails is a warning: the model is saved and fine at fp32. The other processes do not wait for it
    (a long check must not run into the process group's timeout after training is done)."""
    if accelerator.is_main_process:
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith(LAUNCHER_PREFIXES)}
        env["CUDA_VISIBLE_DEVICES"] = ""
        command = [sys.executable, "-m", "nerbatch", "check-precision", cfg.output_dir, cfg.validation]
        command += ["--precision", "int8", "--tokens-column", cfg.tokens_column, "--tags-column", cfg.tags_column]
        command += ["--document-column", cfg.document_column] if cfg.document_column else []
        accelerator.print("int8 check of the best model (on CPU):")
        if subprocess.run(command, env=env).returncode != 0:
            print(
                "nerbatch train: warning: the int8 check failed (above); annotate's --precision auto will not run "
                f"this model at int8 until `nerbatch check-precision {cfg.output_dir} VALIDATION` passes",
                file=sys.stderr,
            )


def forward_backward(accelerator, model, batch: dict, max_tokens: int = 0) -> torch.Tensor:
    """The batch's loss, its gradients accumulated into the model's.

    A batch of more than `max_tokens` subwords (rows x padded length) runs in slices of rows, each
    slice's loss weighted by its share of the batch's labelled subwords: the gradients add up to the
    whole batch's (only the dropout draws differ), while the activations held for the backward pass
    are one slice's. Those dominate training memory for long inputs: a batch of 32 windows of 256
    subwords keeps 12 attention maps of 256 x 256 per window and layer (benchmarks/README.md).
    """
    rows, width = batch["input_ids"].shape
    if not max_tokens or rows * width <= max_tokens or rows == 1:
        loss = model(**batch).loss
        accelerator.backward(loss)
        return loss.detach()
    step = max(1, max_tokens // width)
    labelled = batch["labels"].ne(-100).sum(dim=1).tolist()
    total = sum(labelled)
    slices = [(start, min(start + step, rows)) for start in range(0, rows, step)]
    slices = [(a, b) for a, b in slices if sum(labelled[a:b])]  # no labels, no gradient (and no 0/0 loss)
    loss_sum = torch.zeros((), device=batch["input_ids"].device)
    for i, (a, b) in enumerate(slices):
        # gradients are synchronised across processes once, with the batch's last slice
        syncing = contextlib.nullcontext() if i == len(slices) - 1 else accelerator.no_sync(model)
        with syncing:
            loss = model(**{k: v[a:b] for k, v in batch.items()}).loss * (sum(labelled[a:b]) / total)
            accelerator.backward(loss)
        loss_sum += loss.detach()
    return loss_sum


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm weights (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=torch.cuda.is_available() or None)


def save_model(accelerator: Accelerator, model, tokenizer, directory: Path) -> None:
    """`save_pretrained` the unwrapped model (through `accelerator.save`) and the tokenizer."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(directory, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(directory)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (one whose progress.json was written last) or None."""
    done = sorted(output_dir.glob("checkpoints/step_*/progress.json"))
    return done[-1].parent if done else None


def save_checkpoint(accelerator: Accelerator, output_dir: Path, progress: dict, keep: int) -> None:
    """`save_state` into checkpoints/step_N, then write progress.json last, marking it complete.

    Only complete checkpoints older than this one are pruned, so a crash at any moment leaves at
    least one complete checkpoint behind.
    """
    directory = output_dir / "checkpoints" / f"step_{progress['global_step']:08d}"
    if accelerator.is_main_process:
        (directory / "progress.json").unlink(missing_ok=True)  # incomplete until rewritten below
    accelerator.wait_for_everyone()
    accelerator.save_state(str(directory))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (directory / "progress.json").write_text(json.dumps(progress, indent=1))
        complete = sorted(p.parent for p in output_dir.glob("checkpoints/step_*/progress.json"))
        for old in complete[: complete.index(directory) + 1][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def check_resumable(saved: dict, cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint written with different settings (model, data, schedule...)."""
    current, defaults = cfg.to_dict(), TrainConfig().to_dict()
    # a key the checkpoint lacks was added in a later version: it ran with that key's default
    saved = {**defaults, **saved}
    changed = {k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]}
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in sorted(changed))
        raise ConfigError(f"cannot resume from {checkpoint}: the run was started with other settings ({details})")


def restore(accelerator: Accelerator, output_dir: Path, cfg: TrainConfig) -> dict | None:
    """Load the latest complete checkpoint into the prepared objects and return its progress record
    (None when there is none yet). A checkpoint of a different run or process count is refused."""
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        accelerator.print(f"--resume: no checkpoint under {output_dir}/checkpoints, starting from scratch")
        return None
    saved = json.loads((checkpoint / "progress.json").read_text())
    check_resumable(saved["config"], cfg, checkpoint)
    if saved.get("processes") != accelerator.num_processes:  # batches_done counts per-process batches
        raise ConfigError(
            f"cannot resume from {checkpoint}: it was written by {saved.get('processes')} "
            f"processes, this run has {accelerator.num_processes}; resume with the same count"
        )
    accelerator.load_state(str(checkpoint))
    accelerator.print(
        f"resumed from {checkpoint}: epoch {saved['epoch']}, batch {saved['batches_done']}, step {saved['global_step']}"
    )
    return saved | {"config": cfg.to_dict()}


# What `nerbatch train` writes into --output-dir: the best model and its tokenizer (save_pretrained),
# metrics, epochs and checkpoints. --overwrite deletes these names and nothing else.
TRAIN_OUTPUT_NAMES = (
    "metrics.json", "checkpoints", "epoch_*", "config.json", "generation_config.json", "model*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin", "tokenizer*", "special_tokens_map.json", "vocab*",
    "merges.txt", "added_tokens.json", "*.model", "chat_template*", "nerbatch_precision.json",
)  # fmt: skip


def is_training_output(directory: Path) -> bool:
    """Whether `directory` holds what `nerbatch train` writes (metrics, checkpoints, epochs)."""
    return (
        (directory / "metrics.json").exists() or (directory / "checkpoints").exists() or any(directory.glob("epoch_*"))
    )


def _written_by_train(name: str) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(name, pattern) for pattern in TRAIN_OUTPUT_NAMES)


def prepare_output_dir(
    accelerator: Accelerator, output_dir: Path, resume: bool, overwrite: bool, model_dir: Path | None = None
) -> None:
    """One run per directory: a fresh run needs a new or empty `output_dir`, or `overwrite` to clear
    an earlier run's (epochs and checkpoints of two runs side by side would be mixed up, and the
    newest checkpoint, which `--resume` takes, might be the other run's)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file, not a directory")
    contents = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if resume or not contents:
        return
    listed = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
    if not overwrite:
        raise ConfigError(
            f"output_dir {output_dir} is not empty ({listed}); pass --resume to continue the run in it, "
            "--overwrite to replace it, or another --output-dir"
        )
    foreign = [name for name in contents if not _written_by_train(name)]
    if not is_training_output(output_dir) or foreign:
        raise ConfigError(
            f"output_dir {output_dir} holds files that `nerbatch train` did not write "
            f"({', '.join(foreign[:4]) or listed}); "
            "--overwrite only replaces an earlier training run: pick another --output-dir"
        )
    if model_dir is not None and model_dir.resolve().is_relative_to(output_dir.resolve()):
        raise ConfigError(f"--overwrite would delete the model to train from ({model_dir}): pick another --output-dir")
    accelerator.wait_for_everyone()  # every process has looked before the files go
    if accelerator.is_main_process:
        for child in output_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    accelerator.wait_for_everyone()


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the whole training job; returns the best epoch's metrics (main process writes files).
    `overwrite` clears an earlier run in `cfg.output_dir` (without it, or `resume`, one is an error)."""
    accelerator = make_accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.report_to,
        project_dir=cfg.output_dir,
        # Batches are pinned (make_loader), so their copy to the GPU need not wait for the GPU to
        # drain the previous step: a blocking copy would leave it idle while the next batch is collated.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    model_dir = Path(cfg.model) if Path(cfg.model).exists() else None
    prepare_output_dir(accelerator, output_dir, resume, overwrite, model_dir)
    tokenizer = load_tokenizer(cfg.model)  # a slow tokenizer fails here, before any work

    with accelerator.main_process_first():  # the main process fills the hub/dataset caches first
        train_corpus, val_corpus = load_splits(cfg)
    if accelerator.is_main_process:
        for warning in train_corpus.warnings + val_corpus.warnings:
            print(f"nerbatch train: warning: {warning}", file=sys.stderr)
    model, labels = load_model(cfg.model, build_label_list(train_corpus))
    label2id = {label: i for i, label in enumerate(labels)}
    check_labels(val_corpus, label2id)
    check_labels(train_corpus, label2id)
    max_length = window_length(cfg.max_length, tokenizer, model.config)
    select = selection_level(cfg, val_corpus)
    val_documents = None
    if val_corpus.has_documents:  # scored as users' text may come: with line breaks and without
        val_documents = {join: build_documents(val_corpus, join) for join in ("newline", "space")}
    # How the model is trained travels in its config.json, so that annotate can follow it.
    model.config.nerbatch = {
        "context": cfg.context,
        "window": min(cfg.context_window, max_length) if cfg.context == "document" else max_length,
        "max_segment": sentence_length_cap(tokenizer, train_corpus),
    }
    pad8 = 8 if accelerator.mixed_precision in ("fp16", "bf16") else None
    collator = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad8)
    train_enc = training_features(cfg, tokenizer, train_corpus, label2id, max_length)
    train_dl = make_loader(
        train_enc, collator, cfg.batch_size, cfg.seed, train=True, group=cfg.group_by_length, lone_share=cfg.lone_share
    )
    sampler = train_dl.batch_sampler
    val_enc, val_dl = eval_loader(tokenizer, val_corpus.sentences, label2id, max_length, collator, cfg.eval_batch_size)
    accelerator.print(
        f"train: {len(train_corpus)} sentences -> {len(train_enc.features)} features "
        f"({sampler.epoch_size()} per epoch), {cfg.context} context "
        f"({train_enc.split_sentences} longer than {max_length} subwords, split between words); "
        f"validation: {len(val_corpus)} sentences ({val_enc.split_sentences} split); labels: {labels}; "
        f"training on {describe(accelerator.num_processes)} ({on_device(accelerator.device)}); best epoch by "
        f"{select}-level validation F1"
    )
    optimizer = make_optimizer(model, cfg)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    # Sized on this process's share of the batches; the prepared scheduler advances once per
    # process for every optimizer update, hence the factor.
    updates = math.ceil(len(train_dl) / cfg.gradient_accumulation_steps) * cfg.epochs
    steps = updates * accelerator.num_processes
    scheduler = accelerator.prepare(get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * steps), steps))

    progress = {
        "epoch": 0,
        "batches_done": 0,
        "global_step": 0,
        "best_f1": -1.0,
        "best_epoch": None,
        "history": [],
        "config": cfg.to_dict(),
        "labels": labels,
        "processes": accelerator.num_processes,
    }
    if resume:
        progress = restore(accelerator, output_dir, cfg) or progress

    if cfg.report_to:
        accelerator.init_trackers("nerbatch", config={k: v for k, v in cfg.to_dict().items() if v is not None})
    id2label = dict(enumerate(labels))
    gold = [s.tags for s in val_corpus.sentences]
    bar = tqdm(
        total=len(train_dl) * cfg.epochs,
        initial=progress["epoch"] * len(train_dl) + progress["batches_done"],
        disable=not accelerator.is_local_main_process,
        desc="train",
        unit="batch",
    )
    for epoch in range(progress["epoch"], cfg.epochs):
        sampler.set_epoch(epoch)  # our batch order; accelerate does not forward set_epoch to a batch sampler
        train_dl.set_epoch(epoch)  # accelerate's own epoch counter, copied by skip_first_batches
        model.train()
        skip = progress["batches_done"] if epoch == progress["epoch"] else 0
        batches = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        started, loss_sum = time.perf_counter(), torch.zeros((), device=accelerator.device)
        for batch_index, batch in enumerate(batches, start=skip):
            with accelerator.accumulate(model):
                loss = forward_backward(accelerator, model, batch, cfg.micro_batch_tokens)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()  # stays on device: no host sync per step
            bar.update(1)
            if not accelerator.sync_gradients:
                continue
            progress["global_step"] += 1
            if progress["global_step"] % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            last = batch_index + 1 == len(train_dl)  # the epoch-end checkpoint below covers it
            if cfg.checkpoint_every and progress["global_step"] % cfg.checkpoint_every == 0 and not last:
                progress |= {"epoch": epoch, "batches_done": batch_index + 1}
                save_checkpoint(accelerator, output_dir, progress, cfg.keep_checkpoints)

        seconds = time.perf_counter() - started
        metrics = evaluate_features(accelerator, model, val_dl, val_enc.features, gold, id2label)
        ran = len(train_dl) - skip
        train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / ran if ran else None
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_seconds": seconds,
            "resumed_mid_epoch": bool(skip),
            **metrics,
        }
        line = f"sentence f1 {metrics['overall_f1']:.4f}"
        if val_documents is not None:
            scores = score_documents(accelerator, model, tokenizer, cfg, val_corpus, val_documents)
            record["document"], record["document_space"] = scores["newline"], scores["space"]
            record["document_f1"], record["document_f1_by_segment_and_join"] = (
                scores["f1"],
                scores["f1_by_segment_and_join"],
            )
            accelerator.unwrap_model(model).config.nerbatch["segment"] = scores["segment"]  # annotate's default
            line += (
                f", document f1 {scores['newline']['overall_f1']:.4f} newline-joined, "
                f"{scores['space']['overall_f1']:.4f} space-joined (segment {scores['segment']})"
            )
        progress["history"].append(record)
        accelerator.print(f"epoch {epoch + 1}: {line}, loss {train_loss or float('nan'):.4f} ({seconds:.0f} s)")
        accelerator.log(
            {k: v for k, v in record.items() if isinstance(v, (int, float))}
            | {"document_f1": record.get("document_f1", float("nan"))},
            step=epoch + 1,
        )
        save_model(accelerator, model, tokenizer, output_dir / f"epoch_{epoch + 1}")
        # document level: the lower of the two joins, so the best epoch is good on both kinds of text
        chosen = record["document_f1"] if select == "document" else metrics["overall_f1"]
        if chosen > progress["best_f1"]:
            progress |= {"best_f1": chosen, "best_epoch": epoch + 1}
            save_model(accelerator, model, tokenizer, output_dir)
        if accelerator.is_main_process:
            (output_dir / "metrics.json").write_text(
                json.dumps(
                    {"best_epoch": progress["best_epoch"], "selected_by": select, "epochs": progress["history"]},
                    indent=1,
                )
            )
        progress |= {"epoch": epoch + 1, "batches_done": 0}
        save_checkpoint(accelerator, output_dir, progress, cfg.keep_checkpoints)
    bar.close()
    accelerator.end_training()
    if cfg.check_int8 and progress["best_epoch"]:
        check_int8(accelerator, cfg)
    return progress["history"][progress["best_epoch"] - 1] if progress["best_epoch"] else {}
