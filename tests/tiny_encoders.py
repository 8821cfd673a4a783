"""Tiny random encoders of many Hugging Face architectures, for tests and bench/survey_models.py.

Each model has 2 layers, hidden size 32 and 4 heads (where the architecture allows), reuses the bundled
MiniLM WordPiece tokenizer (30,522 tokens), and has every 2-D weight redrawn from N(0, 0.2) so that its
attention is far from uniform (a freshly initialised model attends almost uniformly, which hides errors).
"""

from __future__ import annotations

from pathlib import Path

HIDDEN, LAYERS, HEADS = 32, 2, 4

# Per model type: config overrides on top of the common tiny shape (None: use the common shape only).
OVERRIDES: dict[str, dict] = {
    "bert": {}, "roberta": {"max_position_embeddings": 130, "type_vocab_size": 1},
    "distilbert": {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": 2 * HIDDEN},
    "albert": {"embedding_size": 16}, "electra": {"embedding_size": 16},
    "xlm-roberta": {"max_position_embeddings": 130}, "camembert": {"max_position_embeddings": 130},
    "xlm-roberta-xl": {"max_position_embeddings": 130}, "roberta-prelayernorm": {"max_position_embeddings": 130},
    "data2vec-text": {"max_position_embeddings": 130}, "xmod": {"max_position_embeddings": 130, "languages": ["en_XX"], "default_language": "en_XX"},
    "deberta": {}, "deberta-v2": {}, "mpnet": {"max_position_embeddings": 130}, "ernie": {},
    "roformer": {"embedding_size": HIDDEN}, "megatron-bert": {},
    "rembert": {"input_embedding_size": 16, "output_embedding_size": 16},
    "squeezebert": {"embedding_size": HIDDEN, "q_groups": 1, "k_groups": 1, "v_groups": 1,
                    "post_attention_groups": 1, "intermediate_groups": 1, "output_groups": 1},
    "mobilebert": {"embedding_size": 16, "intra_bottleneck_size": HIDDEN, "true_hidden_size": HIDDEN,
                   "num_feedforward_networks": 1},
    "convbert": {"embedding_size": HIDDEN},  # head_ratio 2 (the default): 2 attention heads of 4
    "convbert-ratio1": {"embedding_size": HIDDEN, "head_ratio": 1},
    "funnel": {"block_sizes": [1, 1], "num_decoder_layers": 1, "d_model": HIDDEN, "n_head": HEADS,
               "d_head": HIDDEN // HEADS, "d_inner": 2 * HIDDEN, "num_hidden_layers": None,
               "architectures": ["FunnelModel"]},
    "longformer": {"attention_window": 4, "max_position_embeddings": 130},
    "big_bird": {"attention_type": "original_full"},
    "big_bird-sparse": {"attention_type": "block_sparse", "block_size": 2, "num_random_blocks": 1},
    # num_landmarks == segment_means_seq_len: exact softmax attention (the landmark approximation
    # reshapes by num_landmarks and fails for other lengths); the value convolution still reads padding.
    "nystromformer": {"num_landmarks": 64, "segment_means_seq_len": 64, "conv_kernel_size": 5,
                      "max_position_embeddings": 130},
    "yoso": {"max_position_embeddings": 130}, "mra": {"max_position_embeddings": 130},
    "ibert": {"max_position_embeddings": 130}, "luke": {"entity_vocab_size": 10, "entity_emb_size": 16},
    "layoutlm": {}, "lilt": {"max_position_embeddings": 130, "hidden_size": 48, "channel_shrink_ratio": 4}, "markuplm": {"max_position_embeddings": 130},
    "splinter": {}, "roc_bert": {"pronunciation_vocab_size": 10, "shape_vocab_size": 10,
                                 "enable_pronunciation": False, "enable_shape": False},
    "modernbert": {"global_attn_every_n_layers": 1, "local_attention": 8},
    "flaubert": {"emb_dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS},
    "xlm": {"emb_dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS},
    "bros": {}, "fnet": {}, "tapas": {}, "esm": {},
    "canine": {"downsampling_rate": 2, "num_hash_buckets": 64},
}

# The kinds tested in CI (tests/models/test_capability.py): quick to build and run.
CI_KINDS = (
    "bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "camembert", "deberta",
    "deberta-v2", "mpnet", "ernie", "roformer", "megatron-bert", "rembert", "mobilebert", "convbert",
    "convbert-ratio1", "ibert", "xmod", "layoutlm", "lilt", "markuplm", "splinter", "data2vec-text",
    "roc_bert", "roberta-prelayernorm", "modernbert", "big_bird", "nystromformer", "squeezebert",
    "funnel", "longformer",
)


def model_type(kind: str) -> str:
    return kind.split("-ratio")[0].replace("big_bird-sparse", "big_bird")


def tokenizer_path() -> Path:
    from attnprobe.models.checkpoints import ALIASES, alias_path

    return alias_path(ALIASES["minilm-l6"])


def build_config(kind: str, vocab_size: int, pad_id: int):
    from transformers import CONFIG_MAPPING

    kwargs = dict(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, intermediate_size=2 * HIDDEN, max_position_embeddings=128,
                  pad_token_id=pad_id)
    kwargs.update(OVERRIDES.get(kind, {}))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return CONFIG_MAPPING[model_type(kind)](**kwargs)


def redraw(model, seed: int, scale: float):
    """Every 2-D weight of ``model`` from N(0, scale) with a seeded generator, so attention is far from uniform."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def make_encoder(kind: str, folder: Path, seed: int = 0, scale: float = 0.2) -> Path:
    """Build a tiny random ``kind`` encoder with large-scale weights and save it with a tokenizer."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(), local_files_only=True)
    config = build_config(kind, len(tokenizer), tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = redraw(AutoModel.from_config(config), seed, scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# Architectures whose output_attentions are the pre-softmax scores (read from their transformers source:
# SqueezeBERT's encoder collects ``attention_score`` and applies ``self.softmax`` to it).
RETURNS_SCORES = {"squeezebert"}


def reference_heads(folder: Path, texts: list[str], hops: int = 2):
    """Per-head means of the metrics, one sentence at a time, eager ``output_attentions`` in float64.

    Independent of attnprobe's probe: numpy loops of tests/reference.py over each sentence's attention.
    Returns a dict ``{(layer, head): {metric: value}}`` (token-weighted over sentences, sink_mass
    weighted by sentence length) and the number of queries per head.
    """
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tests.reference import head_metrics

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float64,
                                      local_files_only=True).eval()
    special_ids = set(tokenizer.all_special_ids)
    sums: dict = {}
    for text in texts:
        enc = tokenizer([text], return_tensors="pt")
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        n = enc["input_ids"].shape[1]
        if n < 2:
            continue
        with torch.no_grad():
            attentions = model(**enc, output_attentions=True).attentions
        special = [int(t) in special_ids for t in enc["input_ids"][0]]
        for layer, a in enumerate(attentions):
            if model.config.model_type in RETURNS_SCORES:
                a = torch.softmax(a, dim=-1)
            for head in range(a.shape[1]):
                m = head_metrics(a[0, head].numpy().astype(np.float64), hops=hops, special=special)
                acc = sums.setdefault((layer, head), {"queries": 0.0, "sink_weight": 0.0})
                for k, v in m.items():
                    w = n  # every metric is a per-query mean, sink_mass is weighted by n as well
                    acc[k] = acc.get(k, 0.0) + v * w
                acc["queries"] += n
    out = {}
    for key, acc in sums.items():
        q = acc.pop("queries")
        acc.pop("sink_weight")
        out[key] = {k: v / q for k, v in acc.items()}
        out[key]["queries"] = q
    return out


COMPARED = ("direct_entropy", "direct_entropy_norm", "indirect_entropy", "indirect_entropy_norm", "gtd",
            "self_mass", "local_mass", "first_mass", "special_mass", "sink_mass")


def largest_difference(heads, reference) -> float:
    """Largest absolute difference between a scan's heads frame and ``reference_heads``."""
    if len(heads) != len(reference):
        return float("inf")
    worst = 0.0
    for r in heads.itertuples():
        ref = reference.get((int(r.layer), int(r.head)))
        if ref is None or int(r.queries) != int(ref["queries"]):
            return float("inf")
        for k in COMPARED:
            worst = max(worst, abs(float(getattr(r, k)) - ref[k]))
    return worst


SENTENCES = [
    "The cat sat on the mat.",
    "A dog barked.",
    "Attention heads can collapse onto a few tokens in deeper layers.",
    "Small models attend differently from large ones, and this tool measures how.",
    "Two sentences here.",
    "Every word counts.",
    "It rains.",
]
