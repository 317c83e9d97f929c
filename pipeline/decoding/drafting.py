"""Base-model drafting: batched `generate` over chat prompts with sampling parameters."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from pipeline.models import LoadedModel
from pipeline.prompts import chat_prompt_ids


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


class Drafter:
    """A base model that drafts answers: a Hugging Face model in this process (`kind: hf`) or a model behind
    an OpenAI-compatible endpoint (`kind: openai`). `st` is a base section of a job config (kind, model,
    dtype, device, trust_remote_code, base_url, api_key_env, timeout_s, max_retries, parallel_requests,
    max_new_tokens, temperature, top_p, do_sample)."""

    def __init__(self, st: dict, seed: int = 0):
        self.remote = st["kind"] == "openai"
        self.params = SamplingParams(max_new_tokens=st["max_new_tokens"], temperature=st["temperature"],
                                     top_p=st["top_p"], do_sample=st["do_sample"], seed=seed)
        if self.remote:
            from concurrent.futures import ThreadPoolExecutor

            from pipeline.clients import ChatEndpoint, EndpointConfig

            self.endpoint = ChatEndpoint(EndpointConfig(
                base_url=st["base_url"], model=st["model"], api_key_env=st["api_key_env"],
                timeout_s=st["timeout_s"], max_retries=st["max_retries"]))
            self.pool = ThreadPoolExecutor(st["parallel_requests"])  # concurrent requests
        else:
            from pipeline.models import load_model

            self.lm = load_model(st["model"], dtype=st["dtype"], device=st["device"],
                                 trust_remote_code=st["trust_remote_code"])

    def _request(self, conversation: list[dict]) -> tuple[str, int, float]:
        p = self.params
        c = self.endpoint.chat(conversation, p.max_new_tokens, p.temperature if p.do_sample else 0.0,
                               p.top_p if p.do_sample else 1.0)
        return c.text, c.completion_tokens, c.seconds

    def answer(self, conversations: list[list[dict]], seed_key: str = "") -> list[tuple[str, int, float]]:
        """(text, new tokens, seconds) per conversation: parallel requests to an endpoint, or one batched
        `generate` of the local model seeded by `seed_key` (see `generate_answers`)."""
        if self.remote:
            return list(self.pool.map(self._request, conversations))
        return generate_answers(self.lm, conversations, self.params, seed_key=seed_key)
