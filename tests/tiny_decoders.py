"""Tiny random decoder-only language models of many Hugging Face families, and their reference metrics.

Each model has 2 layers, hidden size 32 and 4 query heads (fewer key/value heads where the family has
grouped-query or multi-query attention), reuses the bundled MiniLM WordPiece tokenizer and has every 2-D weight
redrawn from N(0, 0.2), as tests/tiny_encoders.py does for encoders. ``reference_heads`` computes the metrics one
sentence at a time from transformers' own eager ``output_attentions`` in float64 with numpy loops
(tests/reference.py), with the keys each query sees taken from the config (causal, and the sliding window of
the layers that have one), independently of attnprobe's attention function and probe.
"""

from __future__ import annotations

from pathlib import Path

from tests.tiny_encoders import HEADS, HIDDEN, LAYERS, redraw, tokenizer_path

WINDOW = 4  # sliding windows shorter than the test sentences

# Per family: config overrides on top of the common tiny shape.
OVERRIDES: dict[str, dict] = {
    "gpt2": {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 128},
    "llama": {"num_key_value_heads": 2},
    "qwen2": {"num_key_value_heads": 2},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 8},
    "mistral": {"num_key_value_heads": 2, "sliding_window": WINDOW},
    "gemma2": {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": WINDOW,
               "attn_logit_softcapping": 2.0, "query_pre_attn_scalar": 16,
               "layer_types": ["sliding_attention", "full_attention"]},
    "olmo2": {"num_key_value_heads": 4},
    "phi": {"num_key_value_heads": 4},
    "gpt_neox": {"rotary_pct": 0.5},
    "opt": {"ffn_dim": 2 * HIDDEN, "word_embed_proj_dim": HIDDEN, "enable_bias": True},
    "stablelm": {"num_key_value_heads": 4},
    "granite": {"num_key_value_heads": 2, "attention_multiplier": 0.5},
    "starcoder2": {"num_key_value_heads": 2, "sliding_window": None},
    "gpt_bigcode": {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 128, "multi_query": True},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 256, "num_layers": LAYERS,
                "num_heads": HEADS},
}
FAMILIES = tuple(OVERRIDES)


def build_config(kind: str, vocab_size: int, pad_id: int):
    from transformers import CONFIG_MAPPING

    kwargs = dict(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, intermediate_size=2 * HIDDEN, max_position_embeddings=128,
                  pad_token_id=pad_id, bos_token_id=pad_id, eos_token_id=pad_id)
    kwargs.update(OVERRIDES[kind])
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return CONFIG_MAPPING[kind](**kwargs)


def make_decoder(kind: str, folder: Path, seed: int = 0, scale: float = 0.2) -> Path:
    """Build a tiny random ``kind`` causal LM with large-scale weights and save it with a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(), local_files_only=True)
    config = build_config(kind, len(tokenizer) + 8, tokenizer.pad_token_id)  # some families add a token
    torch.manual_seed(seed)
    model = redraw(AutoModelForCausalLM.from_config(config), seed, scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def windows(config) -> list[int | None]:
    """The sliding window of each layer (None: full causal attention), read from the config."""
    layers = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if config.model_type == "gpt_neo":
        return [config.window_size if t == "local" else None for t in config.attention_layers]
    if not window:
        return [None] * layers
    if types:
        return [window if t == "sliding_attention" else None for t in types[:layers]]
    return [window] * layers


def reference_heads(folder: Path, texts: list[str], hops: int = 2):
    """Per-head means of the metrics under the causal definitions, one sentence at a time, from eager
    ``output_attentions`` in float64: ``{(layer, head): {metric: value, "queries": scored rows}}``."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tests.reference import causal_head_sums

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float64,
                                      local_files_only=True).eval()
    per_layer = windows(model.config)
    special_ids = set(tokenizer.all_special_ids)
    sums: dict = {}
    for text in texts:
        enc = tokenizer([text], return_tensors="pt")
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        ids = enc["input_ids"]
        n = ids.shape[1]
        with torch.no_grad():
            attentions = model(**enc, output_attentions=True).attentions
        special = [int(t) in special_ids for t in ids[0]]
        for layer, a in enumerate(attentions):
            w = per_layer[layer]
            visible = np.array([[k <= i and (w is None or i - k < w) for k in range(n)] for i in range(n)])
            for head in range(a.shape[1]):
                s = causal_head_sums(a[0, head].numpy().astype(np.float64), visible, hops=hops, special=special)
                acc = sums.setdefault((layer, head), {})
                for k, v in s.items():
                    acc[k] = acc.get(k, 0.0) + v
    out = {}
    for key, acc in sums.items():
        q = acc["queries"]
        out[key] = {k: v / q for k, v in acc.items() if k not in ("queries", "sink_weighted", "sink_weight",
                                                                     "unscored")}
        out[key]["sink_mass"] = acc["sink_weighted"] / acc["sink_weight"]
        out[key]["queries"] = q
        out[key]["unscored"] = acc["unscored"]
    return out
