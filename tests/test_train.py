"""The training job end to end: real `accelerate launch`, distributed evaluation, resume, errors."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nerbatch.cli import main
from nerbatch.data import read_conll

from conftest import CONLL, need
from helpers import environment, last_json, nerbatch_command, run, write_conll


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """1,500 training sentences and a 97-sentence validation split (not divisible by 2 or 3)."""
    root = tmp_path_factory.mktemp("splits")
    train = read_conll(need(CONLL / "train.txt")).sentences[:1500]
    valid = read_conll(need(CONLL / "valid.txt")).sentences[:97]
    return write_conll(train, root / "train.conll"), write_conll(valid, root / "valid97.conll")


def train_args(model, splits, out, *extra):
    return [
        "train",
        "--model",
        str(model),
        "--train",
        str(splits[0]),
        "--validation",
        str(splits[1]),
        "--output-dir",
        str(out),
        "--batch-size",
        "16",
        "--eval-batch-size",
        "8",
        "--lr",
        "5e-3",
        "--group-by-length",
        *extra,
    ]


@pytest.mark.slow
def test_two_process_training_evaluates_exactly_like_one_and_three(tiny_model_dir, splits, tmp_path):
    out = tmp_path / "run"
    # best epoch by sentence F1, the level compared below (a weakly trained epoch has near-ties that
    # another batch padding may flip)
    # with batches run in slices, whose gradients are synchronised once per batch
    args = train_args(
        tiny_model_dir, splits, out, "--epochs", "2", "--select-by", "sentence", "--micro-batch-tokens", "200"
    )
    cores = len(os.sched_getaffinity(0))
    assert f"on 2 processes (cpu, {max(1, cores // 2)} thread" in run(args, processes=2)
    metrics = json.loads((out / "metrics.json").read_text())
    trained = metrics["epochs"][metrics["best_epoch"] - 1]  # the saved model's epoch
    assert trained["overall_f1"] > 0.05  # it learned something, so equality below is not trivial

    # at fp32, the precision training scores in: the model carries a passing int8 check, so `auto` may
    # run it at int8, whose near-ties go another way on some CPUs
    evaluate = ["evaluate", str(out), str(splits[1]), "--batch-size", "8", "--precision", "fp32"]
    single, three = run(evaluate), run(evaluate, processes=3)
    assert "on 1 process" in single and "on 3 processes" in three
    single, three = last_json(single), last_json(three)
    assert single == three
    for key in ["overall_precision", "overall_recall", "overall_f1", "overall_accuracy", "PER", "LOC"]:
        assert trained[key] == single[key], key
    assert sum(single[t]["number"] for t in ["PER", "ORG", "LOC", "MISC"] if t in single) == sum(
        t.startswith("B-") for s in read_conll(splits[1]).sentences for t in s.tags
    )

    # the best model sits at the top of the output directory, usable by the transformers pipeline,
    # and `nerbatch predict` prints the same entities as JSON lines
    from transformers import pipeline

    text = "Peter Blackburn of the European Commission visited Brussels and Germany on Monday ."
    expected = pipeline("token-classification", model=str(out), aggregation_strategy="simple")(text)
    lines = run(["predict", str(out), text, "--aggregation", "simple", "--precision", "fp32"]).strip().splitlines()
    predicted = [json.loads(line) for line in lines]
    assert [(e["entity_group"], e["start"], e["end"]) for e in predicted] == [
        (e["entity_group"], e["start"], e["end"]) for e in expected
    ]
    assert all(text[e["start"] : e["end"]] == e["word"] for e in predicted)


class _OneProcess:
    """What `forward_backward` asks of an Accelerator, for one process."""

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        return contextlib.nullcontext()


@pytest.mark.slow
def test_a_lone_process_under_accelerate_launch_trains_on_every_core(tiny_model_dir, splits, tmp_path):
    # accelerate's launcher without --cpu gives its process OMP_NUM_THREADS=1; on a CPU the job
    # takes the cores back (nerbatch.dist.cpu_threads)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nerbatch"]
    args = train_args(tiny_model_dir, splits, tmp_path / "run", "--epochs", "1", "--max-train-samples", "32")
    done = subprocess.run(launcher + args, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cores = len(os.sched_getaffinity(0))
    assert f"on 1 process (cpu, {cores} thread{'s' if cores > 1 else ''})" in done.stdout


def test_a_batch_in_slices_has_the_whole_batch_gradient(tiny_model_dir):
    """Sliced by micro_batch_tokens, a batch gives the loss and gradients of the whole batch (dropout
    off), weighting slices by labelled subwords; a slice without labels adds nothing."""
    from nerbatch.modeling import load_model
    from nerbatch.train import forward_backward

    model, labels = load_model(
        str(tiny_model_dir), ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    )
    model.eval()  # no dropout: the sums must agree
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (6, 12), generator=generator)
    labels = torch.randint(0, len(labels), (6, 12), generator=generator)
    labels[1] = -100  # a row without labels
    labels[2, 4:] = -100  # rows with different label counts: slices weigh differently
    labels[0, [0, 5]] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for max_tokens in (0, 24, 12):  # whole; slices of 2 rows; of 1 row
        model.zero_grad()
        loss = forward_backward(_OneProcess(), model, batch, max_tokens)
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    (whole_loss, whole_grads), *sliced = results
    for loss, grads in sliced:
        assert torch.allclose(loss, whole_loss, atol=1e-6)
        assert all(torch.allclose(g, w, atol=1e-6, rtol=1e-4) for g, w in zip(grads, whole_grads))


@pytest.mark.slow
def test_resume_from_mid_epoch_checkpoint_matches_uninterrupted_run(tiny_model_dir, splits, tmp_path):
    args = ["--epochs", "2", "--max-train-samples", "400", "--checkpoint-every", "10", "--keep-checkpoints", "100"]
    full = tmp_path / "full"
    run(train_args(tiny_model_dir, splits, full, *args))
    steps = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert "step_00000010" in steps and "step_00000025" in steps  # 25 batches of 16 per epoch
    # step 50 is both a multiple of 10 and the end of epoch 2: saved once, as the epoch-end checkpoint
    end = json.loads((full / "checkpoints" / "step_00000050" / "progress.json").read_text())
    assert (end["epoch"], end["batches_done"]) == (2, 0)

    # a run "preempted" after step 10 (mid epoch 1) has only that checkpoint; resuming must
    # replay the same data order, dropout and schedule and end on identical weights
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    os.symlink(full / "checkpoints" / "step_00000010", resumed / "checkpoints" / "step_00000010")
    stdout = run(train_args(tiny_model_dir, splits, resumed, *args, "--resume"))
    assert "resumed from" in stdout and "batch 10" in stdout

    a, b = load_file(full / "epoch_2" / "model.safetensors"), load_file(resumed / "epoch_2" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    metrics = [json.loads((d / "metrics.json").read_text())["epochs"] for d in (full, resumed)]
    assert [e["overall_f1"] for e in metrics[0]] == [e["overall_f1"] for e in metrics[1]]


@pytest.mark.slow
def test_resume_refuses_changed_settings(tiny_model_dir, splits, tmp_path):
    out = tmp_path / "run"
    run(train_args(tiny_model_dir, splits, out, "--epochs", "1", "--max-train-samples", "64"))
    result = CliRunner().invoke(
        main,
        train_args(
            tiny_model_dir, splits, out, "--epochs", "1", "--max-train-samples", "64", "--lr", "1e-3", "--resume"
        ),
    )
    assert result.exit_code == 1
    assert "other settings" in result.output and "lr: 0.005 -> 0.001" in result.output
    # batches_done counts one process's batches, so the process count may not change either
    cmd = nerbatch_command(
        train_args(tiny_model_dir, splits, out, "--epochs", "1", "--max-train-samples", "64", "--resume"), processes=2
    )
    done = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "written by 1 processes, this run has 2" in done.stderr


def test_label_mismatch_is_an_error_before_training(tiny_model_dir, tmp_path):
    data = tmp_path / "people.conll"
    data.write_text("Ada B-PERSON\nLovelace I-PERSON\nwrote O\n\n")
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--train",
            str(data),
            "--validation",
            str(data),
            "--output-dir",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1
    assert "token-classification head with 9 labels" in result.output
    assert "['O', 'B-PERSON', 'I-PERSON']" in result.output
    assert not (tmp_path / "out").exists()


def test_slow_tokenizer_is_an_error_naming_the_model(tmp_path):
    from transformers import CanineConfig, CanineTokenizer

    slow = tmp_path / "slow-model"
    CanineTokenizer().save_pretrained(slow)
    CanineConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32).save_pretrained(slow)
    data = tmp_path / "d.conll"
    data.write_text("Ada B-PER\n\n")
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--model",
            str(slow),
            "--train",
            str(data),
            "--validation",
            str(data),
            "--output-dir",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1
    assert str(slow) in result.output and "slow (pure Python) tokenizer" in result.output
    assert not (tmp_path / "out").exists()


def build_tiny_roberta(directory: Path, words: list[str]) -> Path:
    """A random tiny RoBERTa with a byte-level BPE tokenizer (needs add_prefix_space for split words)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [" ".join(words[i : i + 30]) for i in range(0, len(words), 30)],
        vocab_size=600,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    bpe.save_model(str(directory))  # vocab.json + merges.txt, which AutoTokenizer reads for model_type roberta
    config = RobertaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
    )
    RobertaForMaskedLM(config).save_pretrained(directory)  # a base checkpoint without a NER head
    AutoTokenizer.from_pretrained(directory).save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_roberta_words_get_a_prefix_space_and_train(splits, tmp_path):
    from nerbatch.modeling import load_tokenizer

    sentences = read_conll(splits[0]).sentences[:200]
    model = build_tiny_roberta(tmp_path / "roberta", [w for s in sentences for w in s.words])
    tokenizer = load_tokenizer(str(model))
    # with the prefix space, split words are tokenized as they are in running text (" visited" -> "Ġv"...)
    split = tokenizer(["Blackburn", "visited", "Brussels"], is_split_into_words=True, add_special_tokens=False)
    running = tokenizer(" Blackburn visited Brussels", add_special_tokens=False)
    assert split["input_ids"] == running["input_ids"]
    out = tmp_path / "out"
    run(train_args(model, splits, out, "--epochs", "1", "--max-train-samples", "200", "--max-length", "128"))
    assert json.loads((out / "metrics.json").read_text())["epochs"][0]["overall_accuracy"] > 0.5


@pytest.mark.slow
def test_resume_with_gradient_accumulation_matches_uninterrupted_run(tiny_model_dir, splits, tmp_path):
    # 25 batches per epoch, 2 per update: updates end on batches 2, 4, ... 24 and on 25 (epoch end)
    args = [
        "--epochs",
        "2",
        "--max-train-samples",
        "400",
        "--gradient-accumulation-steps",
        "2",
        "--checkpoint-every",
        "5",
        "--keep-checkpoints",
        "100",
    ]
    full = tmp_path / "full"
    run(train_args(tiny_model_dir, splits, full, *args))
    mid = json.loads((full / "checkpoints" / "step_00000005" / "progress.json").read_text())
    assert (mid["epoch"], mid["batches_done"]) == (0, 10)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    os.symlink(full / "checkpoints" / "step_00000005", resumed / "checkpoints" / "step_00000005")
    assert "batch 10" in run(train_args(tiny_model_dir, splits, resumed, *args, "--resume"))
    a, b = load_file(full / "epoch_2" / "model.safetensors"), load_file(resumed / "epoch_2" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_unreachable_model_is_a_one_line_error(tmp_path):
    data = tmp_path / "d.conll"
    data.write_text("Ada B-PER\n\n")
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--model",
            str(tmp_path / "no-such-model"),
            "--train",
            str(data),
            "--validation",
            str(data),
            "--output-dir",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1
    assert f"{tmp_path / 'no-such-model'}: no such model directory" in result.output


@pytest.mark.slow
def test_a_fresh_run_needs_an_empty_output_dir_or_overwrite(tiny_model_dir, tmp_path):
    """Two runs in one directory would mix their epochs, and --resume could take the other run's checkpoint."""
    demo = Path(__file__).parents[1] / "nerbatch" / "demo_data"
    out = tmp_path / "out"
    (out / "epoch_2").mkdir(parents=True)  # what an earlier two-epoch run leaves
    (out / "metrics.json").write_text("{}")

    def args(directory: Path, *extra: str) -> list[str]:
        return train_args(tiny_model_dir, (demo / "train.conll", demo / "valid.conll"), directory, *extra) + [
            "--epochs",
            "1",
            "--max-train-samples",
            "32",
            "--max-eval-samples",
            "16",
        ]

    refused = CliRunner().invoke(main, args(out))
    assert refused.exit_code == 1 and f"output_dir {out} is not empty (epoch_2, metrics.json)" in refused.output
    run(args(out, "--overwrite"))
    assert sorted(p.name for p in out.glob("epoch_*")) == ["epoch_1"]
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 1
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("not a training run")
    refused = CliRunner().invoke(main, args(notes, "--overwrite"))
    assert refused.exit_code == 1 and "holds files that `nerbatch train` did not write (todo.txt)" in refused.output
    assert (notes / "todo.txt").exists()
    refused = CliRunner().invoke(main, args(notes / "todo.txt"))
    assert refused.exit_code == 1 and "is a file, not a directory" in refused.output


def test_overwrite_never_deletes_the_model_it_trains_from(tiny_model_dir, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_model_dir, out / "epoch_1")  # continue from an earlier run's epoch
    (out / "metrics.json").write_text("{}")
    demo = Path(__file__).parents[1] / "nerbatch" / "demo_data"
    args = train_args(out / "epoch_1", (demo / "train.conll", demo / "valid.conll"), out, "--overwrite")
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "--overwrite would delete the model to train from" in refused.output
    assert (out / "epoch_1" / "model.safetensors").exists()


def test_a_checkpoint_from_before_a_config_key_existed_still_resumes(tmp_path):
    from nerbatch.config import ConfigError, TrainConfig
    from nerbatch.train import check_resumable

    cfg = TrainConfig(output_dir=str(tmp_path))
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ("context", "context_window", "select_by")}
    check_resumable(saved, cfg, tmp_path)  # 0.1.0 checkpoints lack the new keys: they ran with the defaults
    with pytest.raises(ConfigError, match="context: 'sentence' -> 'document'"):
        check_resumable(saved, TrainConfig(output_dir=str(tmp_path), context="document"), tmp_path)
