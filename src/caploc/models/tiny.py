"""Tiny random-weight models of every supported architecture (for tests, benchmarks and examples).

Nothing is downloaded: each model is built from a small config with a fixed seed.
"""
from __future__ import annotations

import torch

TINY_ARCHS = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gptj", "gpt_neox",
)

_COMMON_DECODER = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=1, pad_token_id=0,
)
_IDS = dict(bos_token_id=1, eos_token_id=1)


def tiny_config(model_type: str):
    """A small config of ``model_type`` with 3 layers and 48 MLP neurons per layer (64 for GPT-style models)."""
    from transformers import AutoConfig

    if model_type in ("llama", "mistral", "qwen2"):
        kw = dict(_COMMON_DECODER)
        if model_type == "mistral":
            kw["sliding_window"] = 8  # small window so sliding-window attention is really exercised
        return AutoConfig.for_model(model_type, **kw)
    if model_type == "qwen3":
        return AutoConfig.for_model(model_type, head_dim=8, **_COMMON_DECODER)
    if model_type == "gemma":
        return AutoConfig.for_model(model_type, head_dim=8, hidden_activation="gelu_pytorch_tanh", **_COMMON_DECODER)
    if model_type in ("gemma2", "gemma3_text"):
        return AutoConfig.for_model(
            model_type, head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
            final_logit_softcapping=30.0 if model_type == "gemma2" else None, **_COMMON_DECODER,
        )
    if model_type == "phi3":
        return AutoConfig.for_model(model_type, **_COMMON_DECODER)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=256, n_inner=64, **_IDS)
    if model_type == "gptj":
        return AutoConfig.for_model("gptj", vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=256,
                                    rotary_dim=4, n_inner=64, **_IDS)
    if model_type == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", vocab_size=128, hidden_size=32, num_hidden_layers=3,
                                    num_attention_heads=4, intermediate_size=64, max_position_embeddings=256, **_IDS)
    raise ValueError(f"no tiny config for model_type {model_type!r}; known: {', '.join(TINY_ARCHS)}")


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny ``AutoModelForCausalLM`` of ``model_type`` in eval mode (seeded, deterministic)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg, k, 1 if k != "pad_token_id" else 0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()
