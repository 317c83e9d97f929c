"""Base-model drafting: batched `generate` over chat prompts with sampling parameters."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from .models import LoadedModel
from .prompts import chat_prompt_ids


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    do_sample: bool = True
    seed: int = 0


@torch.inference_mode()
def generate_answers(lm: LoadedModel, conversations: list[list[dict]], params: SamplingParams,
                     seed_key: str = "") -> list[tuple[str, int, float]]:
    """Answer each conversation; returns (text, new tokens, seconds) per conversation.

    The RNG is seeded from `params.seed` and `seed_key` (e.g. the batch's row ids), so a rerun over the
    same rows draws the same samples.
    """
    if not conversations:
        return []
    t0 = time.perf_counter()
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else lm.stop_ids[0]
    ctx = [chat_prompt_ids(tok, c) for c in conversations]
    width = max(map(len, ctx))
    dev = lm.device
    ids = torch.tensor([[pad] * (width - len(c)) + c for c in ctx], device=dev)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in ctx], device=dev)
    torch.manual_seed(int.from_bytes(hashlib.sha256(f"{params.seed}:{seed_key}".encode()).digest()[:4], "little"))
    kw = dict(max_new_tokens=params.max_new_tokens, eos_token_id=lm.stop_ids, pad_token_id=pad,
              do_sample=params.do_sample)
    if params.do_sample:
        kw.update(temperature=params.temperature, top_p=params.top_p, top_k=None)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    out = lm.model.generate(input_ids=ids, attention_mask=mask, **kw)[:, width:].tolist()
    dt = time.perf_counter() - t0
    stops = set(lm.stop_ids)
    results = []
    for gen in out:
        cut = next((i for i, t in enumerate(gen) if t in stops), len(gen))
        results.append((tok.decode(gen[:cut], skip_special_tokens=True).strip(), cut, dt))
    return results
