"""pipeline.clients.ChatEndpoint against a tiny local OpenAI-compatible server whose answers each test scripts."""
import asyncio
import json
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.clients import ChatEndpoint, EndpointConfig, EndpointError, EndpointRejected

MESSAGES = [{"role": "user", "content": "Say hi."}]


def completion_body(text: str = " Hi there. ") -> dict:
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


class Server:
    """Answers POSTs with the scripted (status, body, headers, delay_s) replies in turn, the last one for good,
    and records every request as (path, headers, JSON body, client port)."""

    def __init__(self):
        self.script: list[tuple[int, dict | str, dict, float]] = [(200, completion_body(), {}, 0.0)]
        self.requests: list[tuple[str, dict, dict, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is visible

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                        self.client_address[1]))
                status, reply, headers, delay_s = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                time.sleep(delay_s)
                data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def endpoint():
    """Makes endpoints (timeout 5 s, 2 retries unless told) and closes their blocking clients afterwards."""
    made = []

    def make(url: str, **kw) -> ChatEndpoint:
        made.append(ChatEndpoint(EndpointConfig(base_url=url, model="m", **{"timeout_s": 5.0, "max_retries": 2, **kw})))
        return made[-1]

    yield make
    for ep in made:
        ep.close()


def test_a_normal_answer_over_one_reused_connection(server, endpoint, monkeypatch):
    monkeypatch.setenv("TEST_CLIENT_KEY", "sk-test")
    ep = endpoint(server.url, api_key_env="TEST_CLIENT_KEY", extra_body={"top_k": 5})
    c = ep.chat(MESSAGES, max_tokens=12, temperature=0.0, top_p=0.9)
    assert (c.text, c.completion_tokens, c.prompt_tokens, c.finish_reason) == ("Hi there.", 3, 7, "stop")
    assert 0 < c.seconds < 5
    path, headers, body, port = server.requests[0]
    assert path == "/v1/chat/completions" and headers["authorization"] == "Bearer sk-test"
    assert body == {"model": "m", "messages": MESSAGES, "max_tokens": 12, "temperature": 0.0, "top_p": 0.9, "top_k": 5}
    ep.chat(MESSAGES)
    assert len(server.requests) == 2 and server.requests[1][3] == port  # the same client and connection


def test_a_prediction_is_sent_and_its_counts_read_back(server, endpoint):
    """OpenAI Predicted Outputs: the field goes out as sent; usage.completion_tokens_details comes back when the
    endpoint reports it, and is None when it does not."""
    reply = completion_body()
    reply["usage"]["completion_tokens_details"] = {"accepted_prediction_tokens": 2, "rejected_prediction_tokens": 1}
    server.script = [(200, reply, {}, 0.0), (200, completion_body(), {}, 0.0)]
    ep = endpoint(server.url)
    c = ep.chat(MESSAGES, max_tokens=5, prediction="Hi here.")
    assert server.requests[0][2]["prediction"] == {"type": "content", "content": "Hi here."}
    assert c.prediction_tokens == {"accepted": 2, "rejected": 1}
    c = ep.chat(MESSAGES, max_tokens=5, prediction="Hi here.")
    assert c.text == "Hi there." and c.prediction_tokens is None
    ep.chat(MESSAGES)
    assert "prediction" not in server.requests[2][2]


def test_no_key_means_no_authorization_header(server, endpoint, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    endpoint(server.url).chat(MESSAGES)
    assert "authorization" not in server.requests[0][1]


def test_a_500_is_retried(server, endpoint):
    server.script = [(500, {"error": {"message": "busy"}}, {"Retry-After": "0.05"}, 0.0), (200, completion_body(), {}, 0.0)]
    t0 = time.perf_counter()
    assert endpoint(server.url).chat(MESSAGES).text == "Hi there."
    assert len(server.requests) == 2 and time.perf_counter() - t0 < 2


def test_5xx_after_every_retry_is_an_endpoint_error(server, endpoint):
    server.script = [(503, {"error": {"message": "overloaded"}}, {"Retry-After": "0.01"}, 0.0)]
    with pytest.raises(EndpointError) as e:
        endpoint(server.url, max_retries=2).chat(MESSAGES)
    assert not isinstance(e.value, EndpointRejected) and e.value.status == 503
    assert server.url in str(e.value) and "503" in str(e.value) and "overloaded" in str(e.value)
    assert len(server.requests) == 3


def test_a_400_is_rejected_at_once(server, endpoint):
    server.script = [(400, {"error": {"message": "max_tokens is too large"}}, {}, 0.0)]
    with pytest.raises(EndpointRejected) as e:
        endpoint(server.url).chat(MESSAGES)
    assert isinstance(e.value, ValueError) and e.value.status == 400
    assert "answered 400" in str(e.value) and "max_tokens is too large" in str(e.value)
    assert len(server.requests) == 1


def test_a_timeout_is_retried_then_an_endpoint_error(server, endpoint):
    server.script = [(200, completion_body(), {}, 1.0)]
    t0 = time.perf_counter()
    with pytest.raises(EndpointError) as e:
        endpoint(server.url, timeout_s=0.2, max_retries=1).chat(MESSAGES)
    assert server.url in str(e.value) and "timeout_s=0.2" in str(e.value)
    assert len(server.requests) == 2 and time.perf_counter() - t0 < 5


def test_an_unreachable_endpoint_names_the_url_and_the_cause(endpoint):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(EndpointError) as e:
        endpoint(url, max_retries=0).chat(MESSAGES)
    assert url in str(e.value) and "Connect" in str(e.value)


@pytest.mark.parametrize("reply", [{"choices": []}, {"choices": [{"message": {"content": None}}]}, "<html>oops</html>"])
def test_a_reply_that_is_not_a_chat_completion(server, endpoint, reply):
    server.script = [(200, reply, {}, 0.0)]
    with pytest.raises(EndpointError, match="not a chat completion") as e:
        endpoint(server.url).chat(MESSAGES)
    assert e.value.status == 200 and server.url in str(e.value)


def test_achat_retries_and_reuses_its_client(server, endpoint):
    server.script = [(502, "bad gateway", {"Retry-After": "0.01"}, 0.0), (200, completion_body(" async "), {}, 0.0)]
    ep = endpoint(server.url)

    async def twice():
        answers = [await ep.achat(MESSAGES, max_tokens=5) for _ in range(2)]
        await ep.aclose()
        return answers

    assert [c.text for c in asyncio.run(twice())] == ["async", "async"]
    assert len(server.requests) == 3 and server.requests[1][3] == server.requests[2][3]


def test_bad_configs_are_refused_and_an_endpoint_survives_pickling(server, endpoint, monkeypatch):
    monkeypatch.delenv("TEST_CLIENT_KEY_UNSET", raising=False)
    cfg = EndpointConfig(base_url="localhost:8000", model="", timeout_s=0, max_retries=-1, max_connections=0,
                         api_key_env="TEST_CLIENT_KEY_UNSET")
    assert len(cfg.validate()) == 6
    with pytest.raises(ValueError, match="bad OpenAI endpoint config"):
        ChatEndpoint(cfg)
    ep = endpoint(server.url)
    ep.chat(MESSAGES)
    copy = pickle.loads(pickle.dumps(ep))
    assert copy.chat(MESSAGES).text == "Hi there."
    copy.close()
