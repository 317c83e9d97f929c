"""Base-model drafting: batched `generate` over chat prompts with sampling parameters."""
from __future__ import annotations

import hashlib
import time

import torch

from pipeline.decoding.settings import SamplingParams
from pipeline.models import LoadedModel
from pipeline.prompts import chat_prompt_ids


def draft_seed(seed: int, key: str) -> int:
    """The sampling seed of a draft: from the configured seed and the row (or conversation) key, never from the
    batch, so a rerun draws the same samples on every engine that takes a seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


@torch.inference_mode()
def generate_answers(lm: LoadedModel, conversations: list[list[dict]], params: SamplingParams,
                     seed_key: str = "", max_time: float | None = None,
                     with_ids: bool = False) -> list[tuple[str, int, float] | TimeoutError]:
    """Answer each conversation; returns (text, new tokens, seconds) per conversation, and with `with_ids` the
    answer's token ids (stop token excluded) as a fourth element.

    The RNG is seeded from `params.seed` and `seed_key` (e.g. the batch's row ids), so a rerun over the
    same rows draws the same samples. `max_time` (seconds for the whole batch, None = no limit) is passed to
    `generate`, which stops when it is spent: a conversation it cut off (no stop token, fewer than
    max_new_tokens new tokens) gets a TimeoutError saying so instead of its truncated answer.
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
    torch.manual_seed(draft_seed(params.seed, seed_key))
    kw = dict(max_new_tokens=params.max_new_tokens, eos_token_id=lm.stop_ids, pad_token_id=pad,
              do_sample=params.do_sample)
    if max_time is not None:
        kw["max_time"] = max_time
    if params.do_sample:
        kw.update(temperature=params.temperature, top_p=params.top_p, top_k=None)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    out = lm.model.generate(input_ids=ids, attention_mask=mask, **kw)[:, width:].tolist()
    dt = time.perf_counter() - t0
    stops = set(lm.stop_ids)
    results = []
    for gen in out:
        cut = next((i for i, t in enumerate(gen) if t in stops), None)
        if max_time is not None and cut is None and len(gen) < params.max_new_tokens:
            results.append(TimeoutError(f"generation cut off by the time budget of {max_time:g} s after {len(gen)} of "
                                        f"max_new_tokens {params.max_new_tokens} tokens"))
            continue
        cut = len(gen) if cut is None else cut
        text = tok.decode(gen[:cut], skip_special_tokens=True).strip()
        results.append((text, cut, dt, gen[:cut]) if with_ids else (text, cut, dt))
    return results


class Drafter:
    """A base model that drafts answers: a Hugging Face model in this process (`lm`) or a model behind an
    OpenAI-compatible endpoint (`endpoint`, a `pipeline.clients.EndpointConfig`)."""

    def __init__(self, params: SamplingParams, lm: LoadedModel | None = None, endpoint=None,
                 parallel_requests: int = 8):
        if (lm is None) == (endpoint is None):
            raise ValueError("a Drafter needs exactly one of lm (a local model) or endpoint")
        self.params, self.lm, self.remote = params, lm, endpoint is not None
        if self.remote:
            from concurrent.futures import ThreadPoolExecutor

            from pipeline.clients import ChatEndpoint

            self.endpoint = ChatEndpoint(endpoint)
            self._pool = ThreadPoolExecutor(parallel_requests)  # concurrent requests

    def _request(self, conversation: list[dict]) -> tuple[str, int, float] | Exception:
        p = self.params
        try:
            c = self.endpoint.chat(conversation, p.max_new_tokens, p.temperature if p.do_sample else 0.0,
                                   p.top_p if p.do_sample else 1.0)
        except Exception as e:  # noqa: BLE001 - returned, so one failed request marks only its conversation
            return e
        return c.text, c.completion_tokens, c.seconds

    def answer(self, conversations: list[list[dict]], seed_key: str = "",
               max_time: float | None = None) -> list[tuple[str, int, float] | Exception]:
        """(text, new tokens, seconds) per conversation, or the exception that says why it has none (the others
        still count). An endpoint gets parallel requests, one per conversation (each bounded by the endpoint's
        timeout_s); a local model answers every conversation that fits its context window (`too_long`) in one
        batched `generate` seeded by `seed_key` and bounded by `max_time` seconds (see `generate_answers`)."""
        if self.remote:
            return list(self._pool.map(self._request, conversations))
        problems = [self.too_long(c) for c in conversations]
        fit = [c for c, p in zip(conversations, problems) if p is None]
        answers = iter(generate_answers(self.lm, fit, self.params, seed_key=seed_key, max_time=max_time) if fit else ())
        return [p if p is not None else next(answers) for p in problems]

    def too_long(self, conversation: list[dict]) -> ValueError | None:
        """Why the local model cannot answer this conversation (prompt + max_new_tokens past its context
        window), or None. Checked before `generate`: an over-long prompt would otherwise hold the model for as
        long as attention over it takes, or run it out of memory."""
        why = self.lm.text.too_long(len(chat_prompt_ids(self.lm.tokenizer, conversation)), self.params.max_new_tokens,
                                    "the base model's")
        return ValueError(why) if why else None
