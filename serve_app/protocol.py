"""The OpenAI chat-completions wire format: request validation, responses, SSE chunks and error bodies."""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

# Request fields we accept but cannot honour: refuse them rather than silently ignore them.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "stop",
               "response_format", "logit_bias", "audio", "modalities")
# What OpenAI refuses together with `prediction` (Predicted Outputs), besides n > 1 and positive penalties.
NOT_WITH_PREDICTION = ("logprobs", "top_logprobs", "audio", "max_completion_tokens", "tools", "tool_choice",
                       "functions", "function_call")


class ApiError(Exception):
    """An error answered as an OpenAI-style JSON body with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


class BadRequest(ValueError):
    """Raised by a deployment when the request cannot be served as asked (e.g. over the context window)."""


class UpstreamError(RuntimeError):
    """Raised by a base deployment when its remote endpoint failed."""


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, seed, metadata ...) are ignored
    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    alignment: dict[StrictStr, StrictFloat | StrictInt] | None = None  # DiffPO extra: {vector name: λ}
    prediction: dict | None = None  # OpenAI Predicted Outputs {"type": "content", "content": ...}: check_prediction

    def prediction_text(self) -> str | None:
        """The prediction's text (its text parts joined), or None without one; call after `check_prediction`."""
        if self.prediction is None:
            return None
        content = self.prediction["content"]
        return content if isinstance(content, str) else "".join(part["text"] for part in content)


def _describe(e: ValidationError) -> tuple[str, str | None]:
    errs = e.errors(include_url=False)
    parts = []
    for err in errs[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{len(errs) - 5} more)" if len(errs) > 5 else ""
    first = ".".join(str(x) for x in errs[0]["loc"]) if errs and errs[0]["loc"] else None
    return "; ".join(parts) + more, first


def _refuse(param: str, message: str, code: str = "invalid_prediction") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def check_prediction(req: ChatRequest, data: dict, max_chars: int) -> None:
    """A request's `prediction`: its shape (type "content"; content a string or a non-empty list of
    {"type": "text", "text": str} parts, nothing else), its size (at most `max_chars` characters) and the
    fields OpenAI refuses with it (n > 1, logprobs, positive penalties, audio, non-text modalities,
    max_completion_tokens, tools / function calling). ApiError(400) naming the field otherwise."""
    p = req.prediction
    if set(p) != {"type", "content"}:
        raise _refuse("prediction", "prediction must be {\"type\": \"content\", \"content\": ...} with exactly these "
                                    f"keys (got {sorted(p)})")
    if p["type"] != "content":
        raise _refuse("prediction.type", f"prediction.type must be 'content' (got {p['type']!r})")
    content = p["content"]
    if isinstance(content, list) and content:
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and set(part) == {"type", "text"} and part["type"] == "text"
                    and isinstance(part["text"], str)):
                raise _refuse(f"prediction.content.{i}", f"prediction.content[{i}] must be a text part "
                                                         "{\"type\": \"text\", \"text\": <string>} (nothing else)")
    elif not isinstance(content, str):
        raise _refuse("prediction.content", "prediction.content must be a string or a non-empty list of text parts")
    size = len(req.prediction_text())
    if size > max_chars:
        raise _refuse("prediction.content", f"prediction.content has {size} characters; this server takes at most "
                                            f"{max_chars}", code="prediction_too_large")
    field = _not_with_prediction(req, data)
    if field:
        raise _refuse(field, f"'{field}' cannot be combined with 'prediction' (Predicted Outputs)",
                      code="unsupported_parameter")


def _not_with_prediction(req: ChatRequest, data: dict) -> str | None:
    """The first field set in a way OpenAI refuses together with a prediction, or None."""
    if req.n > 1:
        return "n"
    for k in ("presence_penalty", "frequency_penalty"):
        v = data.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ApiError(400, f"{k} must be a number", param=k)
        if v is not None and v > 0:
            return k
    if data.get("modalities") not in (None, ["text"]):
        return "modalities"
    return next((k for k in NOT_WITH_PREDICTION if data.get(k) not in (None, False, [], {})), None)


def parse_chat_request(raw: bytes, max_messages: int, max_prediction_chars: int = 32_000) -> ChatRequest:
    """Bytes of a POST body -> validated ChatRequest, or ApiError(400) that says what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        msg, param = _describe(e)
        raise ApiError(400, msg, param=param) from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply", code="invalid_json") from None
    if req.prediction is not None:
        check_prediction(req, data, max_prediction_chars)
    for key in UNSUPPORTED:
        if data.get(key) not in (None, [], {}):
            raise ApiError(400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
    if len(req.messages) > max_messages:
        raise ApiError(400, f"at most {max_messages} messages per request (got {len(req.messages)})", param="messages")
    if req.alignment is not None:
        if len(req.alignment) > 64:
            raise ApiError(400, "alignment: at most 64 knobs", param="alignment", code="invalid_alignment")
        bad = [k for k, v in req.alignment.items() if not math.isfinite(v)]
        if bad:
            raise ApiError(400, f"alignment[{bad[0]!r}] must be a finite number", param="alignment",
                           code="invalid_alignment")
    msgs = req.messages
    if msgs[-1].role != "user":
        raise ApiError(400, "the last message must be the user's turn", param="messages")
    if not msgs[-1].plain()["content"].strip():
        raise ApiError(400, "the user's message is empty", param="messages")
    return req


def conversation_key(messages: list[dict]) -> str:
    """A stable id for a conversation: seeds the aligner's reserved tokens and the base's sampling."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def chat_completion(cid: str, model: str, text: str, finish_reason: str, usage: dict, extra: dict) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": usage, "diffpo": extra,
    }


def _chunk(cid: str, model: str, created: int, delta: dict, finish_reason=None, **more) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **more}
    return f"data: {json.dumps(body)}\n\n"


def sse_chunks(cid: str, model: str, text: str, finish_reason: str, usage: dict, extra: dict,
               include_usage: bool, words_per_chunk: int = 4):
    """The finished answer as standard `chat.completion.chunk` events, ending with `data: [DONE]`."""
    created = int(time.time())
    yield sse_head(cid, model, created)
    pieces = re.findall(r"\s*\S+", text) or [text]
    for i in range(0, len(pieces), words_per_chunk):
        yield sse_text(cid, model, created, "".join(pieces[i:i + words_per_chunk]))
    yield from sse_tail(cid, model, created, finish_reason, usage, extra, include_usage)


def sse_head(cid: str, model: str, created: int) -> str:
    """A stream's first chunk: the assistant's role."""
    return _chunk(cid, model, created, {"role": "assistant", "content": ""})


def sse_text(cid: str, model: str, created: int, text: str) -> str:
    return _chunk(cid, model, created, {"content": text})


def sse_tail(cid: str, model: str, created: int, finish_reason: str, usage: dict, extra: dict, include_usage: bool):
    """A stream's end: the chunk with the finish reason (and the `diffpo` extra), the usage chunk if asked for,
    `data: [DONE]`."""
    yield _chunk(cid, model, created, {}, finish_reason, diffpo=extra)
    if include_usage:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                "usage": usage}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def sse_error(message: str, type: str = "server_error", code: str | None = None) -> str:
    """An error after the stream started (the status line is sent): an OpenAI-style error event, which OpenAI's
    clients raise as an APIError, then `data: [DONE]`."""
    return f"data: {json.dumps(error_body(message, type, code))}\n\ndata: [DONE]\n\n"
