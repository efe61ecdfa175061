"""BERT token classifiers in plain torch, for inference, loaded without importing transformers.

Importing transformers' BERT classes takes longer than importing torch itself (they pull in
torch.distributed.tensor, torch._dynamo and scipy), and a short annotate process spends most of its
start-up there. So for BERT token classifiers (`BertForTokenClassification`, absolute positions,
exact GELU, weights in `model.safetensors`) nerbatch builds this module instead: the same parameters
under the same names (query, key and value fused into one projection), the same arithmetic (scaled
dot-product attention, post-LayerNorm). For the outputs of `nerbatch train` the tokenizer is read
from tokenizer.json by the `tokenizers` library alone (`RustTokenizer`, `tokenizer_as_saved`), so
annotate never imports transformers. `unsupported` says why a model is not of that form; such a
model is loaded by transformers as before (`nerbatch.modeling`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Checkpoint entries this module has no use for: a pooler (saved from BertModel) and the position-id
# buffer older transformers saved.
IGNORED_WEIGHTS = ("bert.pooler.", "bert.embeddings.position_ids")
NO_LENGTH_LIMIT = int(1e30)  # transformers' model_max_length when the tokenizer config names none


# transformers' BertConfig defaults, for config.json files that leave a field out
BERT_DEFAULTS = {
    "architectures": None,
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
}


def read_config(directory: Path) -> SimpleNamespace:
    """config.json as attributes, with BertConfig's defaults, `id2label` keyed by int and `num_labels`
    set, as transformers reads it. A file that is not JSON raises ValueError."""
    values = {**BERT_DEFAULTS, **json.loads((directory / "config.json").read_text(encoding="utf-8"))}
    id2label = {int(k): v for k, v in (values.get("id2label") or {}).items()}
    values.update(id2label=id2label, label2id={v: k for k, v in id2label.items()}, num_labels=len(id2label))
    return SimpleNamespace(**values)


def unsupported(directory: Path, config: SimpleNamespace) -> str | None:
    """Why the model in `directory` is not one this module builds, or None when it is."""
    get = vars(config).get
    if get("model_type") != "bert" or get("architectures") != ["BertForTokenClassification"]:
        return f"a {get('model_type')} {get('architectures')} model"
    if get("position_embedding_type", "absolute") != "absolute" or get("hidden_act") != "gelu":
        return "position embeddings or activation other than BERT's"
    if get("is_decoder") or get("add_cross_attention"):
        return "a decoder"
    if not config.id2label:
        return "no labels in config.json"
    if not (directory / WEIGHTS).is_file():
        return f"no {WEIGHTS}"
    return None


def tokenizer_as_saved(directory: Path, config: SimpleNamespace) -> bool:
    """Whether tokenizer.json alone is the tokenizer transformers builds for this model.

    transformers does not take a BERT tokenizer.json as it is: it keeps the vocabulary and rebuilds
    the normalizer, pre-tokenizer and post-processor from tokenizer_config.json and its own defaults.
    What `nerbatch train` saved is the tokenizer transformers built (and rebuilds the same way), so
    for its outputs (`config.nerbatch`) the file is exact; other checkpoints get transformers' own."""
    return bool(getattr(config, "nerbatch", None)) and (directory / TOKENIZER).is_file()


@dataclass
class TokenClassifierOutput:
    logits: torch.Tensor


class BertEmbeddings(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.word_embeddings = _embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = _embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = _embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = self.position_embeddings.weight[: input_ids.shape[1]]
        if token_type_ids is None:  # one segment: every token's type is 0
            types = self.token_type_embeddings.weight[0]
        else:
            types = self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(self.word_embeddings(input_ids) + types + positions)


def _embedding(rows: int, width: int) -> nn.Embedding:
    """An embedding table left uninitialised (the checkpoint fills it): a random initialisation on
    the meta device would import torch._dynamo, a second of start-up."""
    return nn.Embedding(rows, width, _weight=torch.empty(rows, width))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with query, key and value in one projection: one matrix product
    (and, at int8, one quantization of its input) instead of three; the checkpoint's three are
    concatenated on loading (`fuse_qkv`)."""

    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.heads = c.num_attention_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch, length, width)


def fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's `...self.query/key/value` weights and biases as one `...self.qkv` (rows in that
    order, as `BertSelfAttention` splits them); other entries unchanged."""
    fused = dict(state)
    for name in [k for k in state if k.endswith(".self.query.weight")]:
        prefix = name[: -len("query.weight")]
        for kind in ("weight", "bias"):
            parts = [fused.pop(f"{prefix}{p}.{kind}", None) for p in ("query", "key", "value")]
            if any(part is None for part in parts):
                return state  # not BERT's layout: the shape check in `load_classifier` refuses it
            fused[f"{prefix}qkv.{kind}"] = torch.cat(parts)
    return fused


class BertAddNorm(nn.Module):
    """A projection added to the residual stream, then LayerNorm (BERT's SelfOutput and Output)."""

    def __init__(self, width_in: int, c: SimpleNamespace):
        super().__init__()
        self.dense = nn.Linear(width_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.self = BertSelfAttention(c)  # transformers' name, kept for the checkpoint's keys
        self.output = BertAddNorm(c.hidden_size, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertAddNorm(c.intermediate_size, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Bert(nn.Module):
    """transformers' BertModel without the pooler: embeddings, then `encoder.layer`."""

    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.embeddings = BertEmbeddings(c)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))


class BertTokenClassifier(nn.Module):
    """BERT with a token-classification head, its parameters named as transformers names them
    (but for `BertSelfAttention.qkv`)."""

    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.config = config
        self.bert = Bert(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> TokenClassifierOutput:
        x = self.bert.embeddings(input_ids, token_type_ids)
        # keys a query may attend to: True on real tokens; broadcast over heads and queries
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.bert.encoder.layer:
            x = layer(x, mask)
        return TokenClassifierOutput(self.classifier(x))


def load_classifier(directory: Path, config: SimpleNamespace) -> BertTokenClassifier | None:
    """The checkpoint in `directory` in fp32, eval mode; None when its weights are not exactly this
    module's (transformers then loads it, renaming old names or explaining what is missing)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        saved = load_file(directory / WEIGHTS)
    except (OSError, SafetensorError):  # a truncated or foreign file: transformers' loader reports it
        return None
    state = fuse_qkv({k: v for k, v in saved.items() if not k.startswith(IGNORED_WEIGHTS)})
    with torch.device("meta"):  # no random initialisation: every tensor comes from the checkpoint
        model = BertTokenClassifier(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if {k: v.shape for k, v in state.items()} != expected:
        return None
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.eval()


class RustTokenizer:
    """What annotate needs of a fast tokenizer, from tokenizer.json and tokenizer_config.json: the
    Rust tokenizer (`backend_tokenizer`), the padding id and the length limit, as transformers has them."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer

        path = directory / TOKENIZER_CONFIG
        settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        self.backend_tokenizer = Tokenizer.from_file(str(directory / TOKENIZER))
        pad = settings.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_token_id = None if pad is None else self.backend_tokenizer.token_to_id(pad)
        self.model_max_length = int(settings.get("model_max_length") or NO_LENGTH_LIMIT)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)
