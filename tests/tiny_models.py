"""Tiny random-weight models of every supported architecture, built from configs (no network)."""

from __future__ import annotations

import torch

ARCHS = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
# architectures without preset data in lineas_fast.sites.FAMILIES: presets are read off their layers
UNLISTED_ARCHS = ["gpt_neox", "opt", "phi", "falcon"]

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(arch: str):
    import transformers as T

    if arch == "gpt2":
        return T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return T.LlamaConfig(**COMMON)
    if arch == "mistral":
        return T.MistralConfig(**COMMON, sliding_window=None)
    if arch == "qwen2":
        return T.Qwen2Config(**COMMON)
    if arch == "qwen3":
        return T.Qwen3Config(**COMMON, head_dim=8)
    if arch == "gemma2":
        return T.Gemma2Config(**COMMON, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
    if arch == "gemma3":
        return T.Gemma3TextConfig(**COMMON, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
    if arch == "phi3":
        return T.Phi3Config(**COMMON)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt_neox":  # Pythia: mlp.dense_4h_to_h, attention.dense
        return T.GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=128, **ids)
    if arch == "opt":  # fc1/fc2 directly in the block, run on [batch · tokens, width]
        return T.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=32, **ids)
    if arch == "phi":  # mlp.fc2, self_attn.dense
        return T.PhiConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128, **ids)
    if arch == "falcon":  # mlp.dense_4h_to_h, self_attention.dense
        return T.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **ids)
    raise KeyError(arch)


def tiny_model(arch: str, seed: int = 0):
    """A tiny causal LM with random weights; norms get random weights too, so folds are non-trivial."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_batch(batch: int = 3, length: int = 7, seed: int = 0, pad_left: bool = True):
    """input_ids and attention_mask with some padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(1, batch):
        k = min(i * 2, length - 2)
        if pad_left:
            mask[i, :k] = 0
        else:
            mask[i, length - k:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask
