"""Word-level evaluation with seqeval, identical on any number of processes, at two levels.

Sentence level (`evaluate_features`): each sentence is its own input. Evaluation features carry a
label only on each word's first subword, so after `gather` the labelled positions are exactly the
words, in order: each word is scored once, with its first subword's prediction, as the CoNLL
evaluation counts. (Scoring every subword, as the reference loop does, counts a three-piece name as
three chances to be right and skews entity F1.)

Document level (`evaluate_documents`): the accuracy `annotate` delivers. Documents are rebuilt as
running text (`nerbatch.documents`), run through the very `Tagger` that `annotate` uses (same
segmentation, windows and decoding), and the predicted spans are mapped back onto the gold words.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from seqeval.metrics import accuracy_score, classification_report

from nerbatch.align import IGNORE, Feature


def score(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
    """seqeval entity-level metrics in the layout of `evaluate`'s seqeval module.

    Keys: `overall_precision`, `overall_recall`, `overall_f1`, `overall_accuracy`, and for each
    entity type an object with `precision`, `recall`, `f1`, `number` (gold entities).
    """
    report = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    metrics = {}
    for name, row in report.items():
        if name.endswith(" avg"):
            continue
        metrics[name] = {
            "precision": float(row["precision"]),
            "recall": float(row["recall"]),
            "f1": float(row["f1-score"]),
            "number": int(row["support"]),
        }
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    metrics["overall_precision"] = float(micro["precision"])
    metrics["overall_recall"] = float(micro["recall"])
    metrics["overall_f1"] = float(micro["f1-score"])
    metrics["overall_accuracy"] = float(accuracy_score(true_tags, pred_tags))
    return metrics


def eval_loader(tokenizer, sentences, label2id: dict[str, int], max_length: int, collator, batch_size: int):
    """Encode a labelled split for word-level scoring (a label on first subwords only), longest
    first so batches pad little, and its ordered DataLoader. Returns `(encoded, loader)`."""
    from nerbatch.align import encode
    from nerbatch.batching import make_loader, sort_by_length

    encoded = sort_by_length(encode(tokenizer, sentences, label2id, max_length, label_all_subwords=False))
    return encoded, make_loader(encoded, collator, batch_size, 0, train=False, group=False)


def predict_word_labels(accelerator, model, loader, features: list[Feature]) -> list[list[int]]:
    """Run `model` over a prepared eval loader and return, for each feature, one label id per word.

    Every process computes its share; predictions are padded to a common length with
    `pad_across_processes`, gathered, and stripped of the samples the distributed sampler repeats
    to even out the last batch (`gather_for_metrics`). Words the tokenizer maps to no subword get -1.
    """
    model.eval()
    rows: list[np.ndarray] = []
    for batch in loader:
        with torch.inference_mode():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        predictions = accelerator.pad_across_processes(logits.argmax(-1), dim=1, pad_index=IGNORE)
        labels = accelerator.pad_across_processes(batch["labels"], dim=1, pad_index=IGNORE)
        predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        predictions, labels = predictions.cpu().numpy(), labels.cpu().numpy()
        for predicted, gold in zip(predictions, labels):
            rows.append(predicted[gold != IGNORE])
    if len(rows) != len(features):
        raise RuntimeError(f"evaluation gathered {len(rows)} rows for {len(features)} features")
    words = []
    for feature, row in zip(features, rows):
        per_word = [-1] * feature.n_words
        for w, label in zip(feature.scored_words, row):
            per_word[w] = int(label)
        words.append(per_word)
    return words


def assemble_sentences(
    features: list[Feature], word_labels: list[list[int]], n_sentences: int, id2label: dict[int, str]
) -> list[list[str]]:
    """Join per-feature word labels back into whole sentences (features may split a long sentence)."""
    sentences: list[list[str]] = [[] for _ in range(n_sentences)]
    for feature, labels in sorted(zip(features, word_labels), key=lambda x: (x[0].sentence, x[0].first_word)):
        sentences[feature.sentence] += [id2label.get(label, "O") for label in labels]
    return sentences


def evaluate_features(
    accelerator, model, loader, features: list[Feature], gold: list[list[str]], id2label: dict[int, str]
) -> dict:
    """Predict, reassemble sentences and score them against `gold` word tags."""
    word_labels = predict_word_labels(accelerator, model, loader, features)
    predicted = assemble_sentences(features, word_labels, len(gold), id2label)
    return score(gold, predicted)


DOCUMENTS_PER_CALL = 256  # documents tokenized and run together: bounded memory on large splits


def evaluate_documents(tagger, corpus, documents, process_index: int = 0, num_processes: int = 1) -> dict:
    """Annotate `documents` (from `build_documents(corpus)`) as `annotate` would and score the words.

    Each process annotates every `num_processes`-th document; the word tags are gathered to every
    process in document order, so the result does not depend on the process count.
    """
    from nerbatch.documents import spans_to_word_tags, split_by_sentence

    mine = list(range(process_index, len(documents), num_processes))
    tagged: list[tuple[int, list[str]]] = []
    for k in range(0, len(mine), DOCUMENTS_PER_CALL):
        chunk = mine[k : k + DOCUMENTS_PER_CALL]
        spans = tagger.annotate([documents[d].text for d in chunk])
        tagged += [(d, spans_to_word_tags(s, documents[d].words)) for d, s in zip(chunk, spans)]
    if num_processes > 1:
        from accelerate.utils import gather_object

        tagged = gather_object(tagged)
    predicted: list[list[str]] = [[] for _ in corpus.sentences]
    for d, tags in sorted(tagged, key=lambda item: item[0]):
        for index, sentence_tags in zip(documents[d].sentences, split_by_sentence(documents[d], tags)):
            predicted[index] = sentence_tags
    return score([s.tags for s in corpus.sentences], predicted)


def evaluate_dir(
    model_dir: str,
    data: str,
    split: str = "validation",
    batch_size: int = 32,
    max_length: int | None = None,
    tokens_column: str = "tokens",
    tags_column: str = "ner_tags",
    documents: bool = False,
    document_column: str | None = None,
    annotate_options: dict | None = None,
    join: str = "newline",
) -> dict:
    """Evaluate a saved model on a labelled corpus; runs on any number of processes.

    With `documents`, scores the annotate path on the corpus's rebuilt documents (sentences joined
    as `join` says: `nerbatch.documents.JOINS`); `annotate_options`
    (`aggregation`, `max_length`, `stride`, `segment`, ...) are the `Tagger`'s keyword arguments.
    """
    from transformers import DataCollatorForTokenClassification

    from nerbatch.autoprecision import choose_precision, local_model
    from nerbatch.data import check_labels, load_corpus
    from nerbatch.dist import make_accelerator
    from nerbatch.modeling import load_token_classifier, window_length

    accelerator = make_accelerator()
    model, tokenizer = load_token_classifier(model_dir)
    with accelerator.main_process_first():
        corpus = load_corpus(data, split, tokens_column, tags_column, document_column)
    if accelerator.is_main_process:
        for warning in corpus.warnings:
            print(f"nerbatch evaluate: warning: {warning}", file=sys.stderr)
    label2id = {label: int(i) for label, i in model.config.label2id.items()}
    check_labels(corpus, label2id)
    # the precision annotate would run with these options here, so the score is what annotate delivers
    choice = choose_precision(
        (annotate_options or {}).get("precision") or "auto", accelerator.device.type, local_model(model_dir)
    )
    annotate_options = {**(annotate_options or {}), "precision": choice.precision}
    if documents:
        from nerbatch.documents import build_documents
        from nerbatch.inference import Tagger, cpu_lanes

        rebuilt = build_documents(corpus, join)
        lanes = cpu_lanes(accelerator.device)  # as annotate runs (the probabilities are the same)
        tagger = Tagger(model.to(accelerator.device), tokenizer, **(annotate_options or {}), lanes=lanes)
        say_choice(accelerator, choice)  # once the data and the options are checked
        try:
            return evaluate_documents(tagger, corpus, rebuilt, accelerator.process_index, accelerator.num_processes)
        finally:
            tagger.close()
    from nerbatch.precision import AutocastWithFallback, autocast_dtype, cast_bf16, quantize_int8

    precision = choice.precision
    if precision == "int8":
        model = quantize_int8(model, tokenizer, inplace=True)  # loaded here: no copy needed
    elif precision == "bf16" and accelerator.device.type == "cpu":
        model = cast_bf16(model, inplace=True)
    length = window_length(max_length, tokenizer, model.config)
    say_choice(accelerator, choice)
    encoded, loader = eval_loader(
        tokenizer, corpus.sentences, label2id, length, DataCollatorForTokenClassification(tokenizer), batch_size
    )
    id2label = {int(i): label for i, label in model.config.id2label.items()}
    # inference only: the model is not wrapped for gradient sync, only the loader is sharded
    model, loader = model.to(accelerator.device), accelerator.prepare(loader)
    gold = [s.tags for s in corpus.sentences]
    dtype = autocast_dtype(precision, accelerator.device.type)
    if dtype is not None:
        model = AutocastWithFallback(model, dtype)
    return evaluate_features(accelerator, model, loader, encoded.features, gold, id2label)


def say_choice(accelerator, choice) -> None:
    """Print the precision evaluation runs at and why (main process), once the data is checked."""
    if accelerator.is_main_process:
        print(f"nerbatch evaluate: {choice.describe()}", file=sys.stderr)
