"""Loading tokenizers and token-classification models, with the checks that save a wasted run."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

# Byte-level BPE tokenizers need a leading space on every word for `is_split_into_words=True`.
PREFIX_SPACE_MODELS = {"roberta", "longformer", "bart", "gpt2", "deberta"}
# Models whose position ids start after the padding index, so two positions are unusable.
OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "camembert", "longformer"}


class ModelError(ValueError):
    """A model or tokenizer that cannot be used for this job; the message says why and what to do."""


def load_tokenizer(name: str):
    """Load the fast tokenizer of `name` (hub id or local dir); a slow tokenizer is an error."""
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as exc:  # no hub access, a typo, or a directory without config.json
        raise ModelError(f"could not load model {name!r}: {str(exc).splitlines()[0]} Pass a local model "
                         "directory with --model when offline.") from exc
    kwargs = {"add_prefix_space": True} if config.model_type in PREFIX_SPACE_MODELS else {}
    tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True, **kwargs)
    if not tokenizer.is_fast:
        raise ModelError(f"{name}: {type(tokenizer).__name__} is a slow (pure Python) tokenizer; nerbatch needs a "
                         "fast one for word ids and character offsets. Convert it with `tokenizers` or pick a "
                         "model that ships tokenizer.json")
    return tokenizer


def max_model_length(tokenizer, config) -> int:
    """The longest input (in subwords, special tokens included) the model accepts."""
    limit = config.max_position_embeddings
    if config.model_type in OFFSET_POSITION_MODELS:
        limit -= 2
    if tokenizer.model_max_length and tokenizer.model_max_length < limit:
        limit = tokenizer.model_max_length
    return int(limit)


def check_head(name: str, config, labels: list[str]) -> dict[str, int] | None:
    """Compare a checkpoint's classification head with the data's labels.

    Returns None when the checkpoint has no token-classification head (a new one is created).
    When it has one with the same label names, returns its `label2id` (the data is mapped onto the
    checkpoint's order). A different label count or names is an error: loading it anyway is what
    produces CUDA device-side asserts or a silently re-initialised head.
    """
    architectures = config.architectures or []
    if not any(a.endswith("ForTokenClassification") for a in architectures):
        return None
    theirs = [config.id2label[i] for i in range(config.num_labels)]
    if sorted(theirs) != sorted(labels):
        raise ModelError(f"{name} has a token-classification head with {len(theirs)} labels {theirs}, but the "
                         f"training data has {len(labels)} labels {labels}. Start from the base encoder, or "
                         "train on data with the checkpoint's label set.")
    return {label: i for i, label in enumerate(theirs)}


def load_model(name: str, labels: list[str]):
    """Load `AutoModelForTokenClassification` with `id2label`/`label2id` taken from `labels`.

    `labels` may be reordered to match an existing head (see `check_head`); the order used is
    returned with the model as `(model, labels)`.
    """
    config = AutoConfig.from_pretrained(name)
    existing = check_head(name, config, labels)
    if existing is not None:
        labels = sorted(existing, key=existing.get)
    id2label = dict(enumerate(labels))
    model = AutoModelForTokenClassification.from_pretrained(
        name, num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    return model, labels
