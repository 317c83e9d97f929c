"""Tiny random models with a real (byte-level) tokenizer and chat template, for tests and smoke runs.

They load through the same `load_model(path)` as any Hugging Face folder, so tests exercise the real
code path without downloading anything. Outputs are random text; only exactness properties matter.

`ARCHS` attend to the whole prefix in every layer. `WINDOWED_ARCHS` have sliding-window attention with a
window of 8 positions, shorter than the test sequences: Gemma-2 and Gemma-3 text models alternate sliding and
full layers (sliding first), Mistral slides in every layer. The Gemma models come with `tiny_tokenizer("gemma")`:
Gemma's own chat template (no system role, `<end_of_turn>` closing each turn) and a BOS it adds.
"""
from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "<bos>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Gemma's specials in the same 6 ids, so every tiny tokenizer has 262 tokens
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# google/gemma-2-9b-it's chat template, verbatim
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
ARCHS = ("llama", "qwen2", "gpt2")
WINDOWED_ARCHS = ("gemma2", "gemma3", "mistral")
WINDOW = 8


def tiny_tokenizer(style: str = "plain"):
    """Byte-level BPE without merges: every string round-trips; 256 bytes + 6 special tokens.

    style "plain": a minimal chat template ending turns with <eos>, no BOS. style "gemma": Gemma-2's chat
    template and, like Gemma's tokenizer, a BOS prepended whenever special tokens are added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"plain": SPECIALS, "gemma": GEMMA_SPECIALS}[style]
    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(byte_vocab):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if style == "gemma":
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   additional_special_tokens=specials[3:])
    fast.chat_template = GEMMA_CHAT_TEMPLATE if style == "gemma" else CHAT_TEMPLATE
    return fast


def tiny_model(arch: str, vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64, **overrides):
    """A random `arch` causal LM (ARCHS or WINDOWED_ARCHS); `overrides` go to its config."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    gemma = dict(common, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, layer_types=alternating)
    families = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, common),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, common),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(vocab_size=vocab_size, n_embd=hidden, n_layer=layers,
                                                         n_head=4, n_positions=4096, pad_token_id=0, eos_token_id=1,
                                                         bos_token_id=2)),
        # eager attention (transformers' choice for Gemma-2) with logit soft-capping (defaults 50 and 30)
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, gemma),
        # text only, sdpa attention, another RoPE base for the sliding layers
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, gemma),
        # sdpa attention, the window in every layer
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(common, sliding_window=WINDOW)),
    }
    if arch not in families:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS + WINDOWED_ARCHS}")
    config_cls, model_cls, kwargs = families[arch]
    cfg = config_cls(**{**kwargs, **overrides})
    model = model_cls(cfg)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_tiny(arch: str, out_dir, seed: int = 0, **overrides) -> Path:
    """Write a tiny model + tokenizer folder that `load_model(out_dir)` can load (`overrides`: see tiny_model)."""
    out_dir = Path(out_dir)
    tok = tiny_tokenizer("gemma" if arch.startswith("gemma") else "plain")
    model = tiny_model(arch, len(tok), seed=seed, **overrides)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
