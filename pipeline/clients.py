"""An OpenAI-compatible chat endpoint as a base model: a vLLM or TGI server, a hosted API, or this project's
own Serve app. Used by the Serve base deployment of kind ``openai`` and by the batch job's draft stage.

The API key is read from an environment variable named in the config (``api_key_env``), never from a file.
Transport errors, timeouts, 429 and 5xx answers are retried with exponential backoff (``Retry-After`` is
honoured up to ``max_backoff_s``); other 4xx answers mean the endpoint refused the request and raise
`EndpointRejected` (a ValueError) at once.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field

import httpx

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class EndpointConfig:
    base_url: str  # up to and including the version, e.g. http://10.0.0.5:8000/v1
    model: str  # the model name the endpoint knows
    api_key_env: str | None = None  # name of the environment variable that holds the key
    timeout_s: float = 60.0  # per attempt
    max_retries: int = 3
    backoff_s: float = 0.5  # first retry delay; doubles per retry, with jitter
    max_backoff_s: float = 8.0
    extra_body: dict = field(default_factory=dict)  # endpoint-specific fields sent with every request

    def validate(self) -> list[str]:
        problems = []
        if not self.base_url.startswith(("http://", "https://")):
            problems.append(f"base_url must start with http:// or https:// (got {self.base_url!r})")
        if not self.model:
            problems.append("model (the name at the endpoint) must be set")
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0 (got {self.timeout_s})")
        if self.max_retries < 0:
            problems.append(f"max_retries must be >= 0 (got {self.max_retries})")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            problems.append(f"environment variable {self.api_key_env} (api_key_env) is not set")
        return problems


@dataclass
class Completion:
    text: str
    completion_tokens: int | None
    prompt_tokens: int | None
    finish_reason: str | None
    seconds: float


class EndpointError(RuntimeError):
    """The endpoint could not answer (unreachable, timed out, 5xx after all retries, or a malformed reply)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class EndpointRejected(EndpointError, ValueError):
    """The endpoint refused this request with a 4xx answer; retrying would not help."""


class ChatEndpoint:
    def __init__(self, cfg: EndpointConfig):
        problems = cfg.validate()
        if problems:
            raise ValueError("bad OpenAI endpoint config: " + "; ".join(problems))
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            self.headers["Authorization"] = f"Bearer {os.environ[cfg.api_key_env]}"

    def payload(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float) -> dict:
        body = {"model": self.cfg.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "stream": False}
        body.update(self.cfg.extra_body)
        return body

    def _parse(self, resp: httpx.Response, seconds: float) -> Completion:
        if resp.status_code >= 400:
            detail = resp.text[:500]
            cls = EndpointRejected if resp.status_code < 500 and resp.status_code not in RETRY_STATUS else EndpointError
            raise cls(f"{self.url} answered {resp.status_code}: {detail}", resp.status_code)
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("message.content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise EndpointError(f"{self.url} sent a reply that is not a chat completion ({e}): {resp.text[:300]}",
                                resp.status_code) from None
        usage = data.get("usage") or {}
        return Completion(text.strip(), usage.get("completion_tokens"), usage.get("prompt_tokens"),
                          choice.get("finish_reason"), seconds)

    def _delay(self, attempt: int, resp: httpx.Response | None) -> float:
        if resp is not None and resp.headers.get("retry-after", "").replace(".", "", 1).isdigit():
            return min(float(resp.headers["retry-after"]), self.cfg.max_backoff_s)
        return min(self.cfg.backoff_s * 2 ** attempt, self.cfg.max_backoff_s) * (0.5 + random.random() / 2)

    def _retryable(self, attempt: int, resp: httpx.Response | None) -> bool:
        return attempt < self.cfg.max_retries and (resp is None or resp.status_code in RETRY_STATUS)

    def _outcome(self, attempt: int, resp: httpx.Response | None, err: Exception | None,
                 t0: float) -> tuple[Completion | None, float]:
        """What one attempt means: (the completion, 0) when it is final, (None, delay) to try again after the
        delay; raises when the endpoint refused the request or every attempt is spent."""
        if resp is not None and (resp.status_code < 400 or not self._retryable(attempt, resp)):
            return self._parse(resp, time.perf_counter() - t0), 0.0
        if not self._retryable(attempt, resp):
            raise EndpointError(f"{self.url} failed after {attempt + 1} attempts: "
                                f"{type(err).__name__}: {err}" if err else f"{self.url} failed")
        return None, self._delay(attempt, resp)

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.7,
             top_p: float = 1.0) -> Completion:
        """Blocking call with retries (the batch job's draft stage, the evaluation's LLM judge)."""
        body = self.payload(messages, max_tokens, temperature, top_p)
        with httpx.Client(timeout=self.cfg.timeout_s) as client:
            attempt = 0
            while True:
                t0, resp, err = time.perf_counter(), None, None
                try:
                    resp = client.post(self.url, json=body, headers=self.headers)
                except httpx.HTTPError as e:
                    err = e
                done, delay = self._outcome(attempt, resp, err, t0)
                if done is not None:
                    return done
                time.sleep(delay)
                attempt += 1

    async def achat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.7,
                    top_p: float = 1.0, client: httpx.AsyncClient | None = None) -> Completion:
        """The same call for an event loop (the Serve base deployment passes its pooled client)."""
        body = self.payload(messages, max_tokens, temperature, top_p)
        own = client is None
        client = client or httpx.AsyncClient(timeout=self.cfg.timeout_s)
        try:
            attempt = 0
            while True:
                t0, resp, err = time.perf_counter(), None, None
                try:
                    resp = await client.post(self.url, json=body, headers=self.headers)
                except httpx.HTTPError as e:
                    err = e
                done, delay = self._outcome(attempt, resp, err, t0)
                if done is not None:
                    return done
                await asyncio.sleep(delay)
                attempt += 1
        finally:
            if own:
                await client.aclose()
