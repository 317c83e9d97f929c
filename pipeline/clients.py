"""An OpenAI-compatible chat endpoint as a base model: a vLLM or TGI server, a hosted API, or this project's
own Serve app. Used by the Serve base deployment of kind ``openai``, the batch jobs' draft and judge stages
and the evaluation's LLM judge.

Built on the official ``openai`` client, one per `ChatEndpoint` (a sync ``openai.OpenAI`` and an async
``openai.AsyncOpenAI``, each created on first use and reused, so connections are kept alive across calls;
`close` / `aclose` let them go).
The client does the retrying: transport errors, timeouts, 408, 409, 429 and 5xx answers are retried up to
``max_retries`` times with exponential backoff (0.5 s doubling up to 8 s, with jitter; ``Retry-After``
honoured up to two minutes). Other 4xx answers mean the endpoint refused the request and raise
`EndpointRejected` (a ValueError) at once; anything else that goes wrong raises `EndpointError`.

The API key is read from an environment variable named in the config (``api_key_env``), never from a file;
without one, requests carry no ``Authorization`` header.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import httpx2
import openai

RETRIED_4XX = {408, 409, 429}  # the 4xx answers the openai client retries (like every 5xx)


@dataclass
class EndpointConfig:
    base_url: str  # up to and including the version, e.g. http://10.0.0.5:8000/v1
    model: str  # the model name the endpoint knows
    api_key_env: str | None = None  # name of the environment variable that holds the key
    timeout_s: float = 60.0  # per attempt
    max_retries: int = 3
    max_connections: int = 64  # connection pool size of each of the endpoint's clients
    extra_body: dict = field(default_factory=dict)  # endpoint-specific fields sent with every request

    def validate(self) -> list[str]:
        """The problems with this config, as sentences (empty when it is usable)."""
        problems = []
        if not self.base_url.startswith(("http://", "https://")):
            problems.append(f"base_url must start with http:// or https:// (got {self.base_url!r})")
        if not self.model:
            problems.append("model (the name at the endpoint) must be set")
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0 (got {self.timeout_s})")
        if self.max_retries < 0:
            problems.append(f"max_retries must be >= 0 (got {self.max_retries})")
        if self.max_connections < 1:
            problems.append(f"max_connections must be >= 1 (got {self.max_connections})")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            problems.append(f"environment variable {self.api_key_env} (api_key_env) is not set")
        return problems


@dataclass
class Completion:
    text: str
    completion_tokens: int | None
    prompt_tokens: int | None
    finish_reason: str | None
    seconds: float  # the answering attempt's request/response time
    # usage.completion_tokens_details' Predicted Outputs counts, {"accepted": a, "rejected": r}, when reported
    prediction_tokens: dict | None = None


class EndpointError(RuntimeError):
    """The endpoint could not answer (unreachable, timed out, 5xx after all retries, or a malformed reply)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class EndpointRejected(EndpointError, ValueError):
    """The endpoint refused this request with a 4xx answer; retrying would not help."""


class ChatEndpoint:
    """Chat completions from one endpoint, blocking (`chat`) or in an event loop (`achat`)."""

    def __init__(self, cfg: EndpointConfig):
        problems = cfg.validate()
        if problems:
            raise ValueError("bad OpenAI endpoint config: " + "; ".join(problems))
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        # the openai client insists on a key; without one the header is left out of every request instead
        self._api_key = os.environ[cfg.api_key_env] if cfg.api_key_env else "unused"
        self._headers = {} if cfg.api_key_env else {"Authorization": openai.Omit()}
        self._lock = threading.Lock()  # the draft stage's threads share one endpoint
        self._client: openai.OpenAI | None = None
        self._aclient: openai.AsyncOpenAI | None = None

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg}  # a copy (e.g. shipped to a Ray worker) opens its own connections

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])

    def _client_args(self) -> dict:
        return {"api_key": self._api_key, "base_url": self.cfg.base_url, "timeout": self.cfg.timeout_s,
                "max_retries": self.cfg.max_retries}

    def _limits(self) -> httpx2.Limits:
        return httpx2.Limits(max_connections=self.cfg.max_connections,
                             max_keepalive_connections=self.cfg.max_connections)

    def _sync_client(self) -> openai.OpenAI:
        with self._lock:
            if self._client is None:
                self._client = openai.OpenAI(**self._client_args(),
                                             http_client=openai.DefaultHttpxClient(limits=self._limits()))
            return self._client

    def _async_client(self) -> openai.AsyncOpenAI:
        if self._aclient is None:  # created in the event loop's thread, which has no other user of it
            self._aclient = openai.AsyncOpenAI(**self._client_args(),
                                               http_client=openai.DefaultAsyncHttpxClient(limits=self._limits()))
        return self._aclient

    def close(self) -> None:
        """Close the blocking client's connections (a later `chat` opens new ones)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    async def aclose(self) -> None:
        """Close the event-loop client's connections (a later `achat` opens new ones)."""
        if self._aclient is not None:
            await self._aclient.close()
            self._aclient = None

    def _request(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float,
                 prediction: str | None = None) -> dict:
        req = {"model": self.cfg.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
               "top_p": top_p, "extra_body": self.cfg.extra_body, "extra_headers": self._headers}
        if prediction is not None:  # OpenAI Predicted Outputs
            req["prediction"] = {"type": "content", "content": prediction}
        return req

    def _error(self, e: openai.OpenAIError) -> EndpointError:
        """The endpoint error for what the openai client raised (after its retries)."""
        gave_up = f"{self.url} failed (max_retries={self.cfg.max_retries})"
        if isinstance(e, openai.APIStatusError):
            status, detail = e.status_code, e.response.text[:500]
            if status < 500 and status not in RETRIED_4XX:
                return EndpointRejected(f"{self.url} answered {status}: {detail}", status)
            return EndpointError(f"{gave_up}: answered {status}: {detail}", status)
        if isinstance(e, openai.APITimeoutError):
            return EndpointError(f"{gave_up}: no answer within timeout_s={self.cfg.timeout_s}")
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e
            return EndpointError(f"{gave_up}: {type(cause).__name__}: {cause}")
        status = getattr(e, "status_code", None)  # a reply the client could not read as a chat completion
        return EndpointError(f"{self.url} sent a reply that is not a chat completion: {e}", status)

    def _completion(self, raw) -> Completion:
        """The completion in a raw openai response; EndpointError when the reply is not a usable one."""
        try:
            reply = raw.parse()
            choice = reply.choices[0]
            text = choice.message.content
            if not isinstance(text, str):
                raise TypeError("message.content is not a string")
        except (openai.APIResponseValidationError, ValueError, AttributeError, IndexError, TypeError) as e:
            raise EndpointError(f"{self.url} sent a reply that is not a chat completion ({e}): {raw.text[:300]}",
                                raw.status_code) from None
        usage = reply.usage
        details, predicted = usage.completion_tokens_details if usage else None, None
        if details and None not in (details.accepted_prediction_tokens, details.rejected_prediction_tokens):
            predicted = {"accepted": details.accepted_prediction_tokens, "rejected": details.rejected_prediction_tokens}
        return Completion(text.strip(), usage.completion_tokens if usage else None,
                          usage.prompt_tokens if usage else None, choice.finish_reason, raw.elapsed.total_seconds(),
                          predicted)

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.7,
             top_p: float = 1.0, prediction: str | None = None) -> Completion:
        """Blocking call with retries (the batch jobs' draft and judge stages, the evaluation's LLM judge).
        `prediction`: sent as OpenAI's Predicted Outputs field (an endpoint without it may refuse or ignore it)."""
        try:
            raw = self._sync_client().chat.completions.with_raw_response.create(
                **self._request(messages, max_tokens, temperature, top_p, prediction))
        except openai.OpenAIError as e:
            raise self._error(e) from e
        return self._completion(raw)

    async def achat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.7,
                    top_p: float = 1.0, prediction: str | None = None) -> Completion:
        """The same call for an event loop (the Serve base deployment of kind ``openai``)."""
        try:
            raw = await self._async_client().chat.completions.with_raw_response.create(
                **self._request(messages, max_tokens, temperature, top_p, prediction))
        except openai.OpenAIError as e:
            raise self._error(e) from e
        return self._completion(raw)
