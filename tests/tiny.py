"""Tiny random models with a real (byte-level) tokenizer and chat template, for tests and smoke runs.

They load through the same `load_model(path)` as any Hugging Face folder, so tests exercise the real
code path without downloading anything. Outputs are random text; only exactness properties matter.
"""
from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "<bos>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ARCHS = ("llama", "qwen2", "gpt2")


def tiny_tokenizer():
    """Byte-level BPE without merges: every string round-trips; 256 bytes + 6 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(byte_vocab):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   additional_special_tokens=SPECIALS[3:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(arch: str, vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=4096, **ids)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=4096, **ids)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=4096, **ids)
        model = GPT2LMHeadModel(cfg)
    elif arch == "gemma2":  # sliding-window attention on every other layer (not in ARCHS: the fast engine refuses it)
        from transformers import Gemma2Config, Gemma2ForCausalLM

        cfg = Gemma2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           sliding_window=8, max_position_embeddings=4096, **ids)
        model = Gemma2ForCausalLM(cfg)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS} or gemma2")
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_tiny(arch: str, out_dir, seed: int = 0) -> Path:
    """Write a tiny model + tokenizer folder that `load_model(out_dir)` can load."""
    out_dir = Path(out_dir)
    tok = tiny_tokenizer()
    model = tiny_model(arch, len(tok), seed=seed)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
