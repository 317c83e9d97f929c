"""What the deployments send the ingress (serve_app/replies.py) and what the response makes of it: per-engine
statistics (Jacobi ones only from Jacobi engines, null elsewhere), the `diffpo` extra's keys, the usage, the
aligners' Predicted Outputs accounting, and the Serve metrics each engine records. No Ray cluster needed."""
import pickle
import subprocess
import sys

import pytest

from serve_app.replies import (Draft, DraftRequest, Refined, RefineRequest, diffpo_extra, engine_label, engine_stats,
                               finish_reason, response_usage)

# the keys the `diffpo` extra had before these types: clients (and the Serve tests) read them
ALIGNER_KEYS = {"base", "aligner", "draft_source", "draft_ms", "draft", "iterations", "tokens_per_pass", "converged",
                "refine_ms", "mode", "refine_batch_size"}


def draft(**kw) -> Draft:
    return Draft(**{"text": "Blue.", "completion_tokens": 5, "prompt_tokens": 9, "finish_reason": "stop",
                    "draft_ms": 12.345, "batch_size": 2, **kw})


def refined(engine="fast", **kw) -> Refined:
    stats = {"iterations": 7, "tokens_per_pass": 1.714, "converged": True} if engine in ("fast", "reference") \
        else {"generated_tokens": 13}
    return Refined(**{"text": "Blue, like the sky.", "completion_tokens": 12, "finish_reason": "stop",
                      "refine_ms": 45.678, "batch_size": 3, "engine": engine, **stats, **kw})


def test_a_vllm_reply_has_null_jacobi_stats_and_its_own_count():
    extra = diffpo_extra("tiny", "aligner", draft(), "Blue.", refined("vllm"))
    assert ALIGNER_KEYS | {"engine", "generated_tokens", "draft_prefix"} == set(extra)
    assert extra["iterations"] is None and extra["tokens_per_pass"] is None and extra["converged"] is None
    assert extra["generated_tokens"] == 13
    assert extra["engine"] == extra["mode"] == "vllm"
    assert extra["refine_ms"] == 45.7 and extra["refine_batch_size"] == 3 and extra["draft"] == "Blue."


def test_a_jacobi_reply_has_its_stats_and_no_continuation_count():
    extra = diffpo_extra("tiny", "jacobi", draft(), "Blue.", refined("fast", in_context=True))
    assert (extra["iterations"], extra["tokens_per_pass"], extra["converged"]) == (7, 1.714, True)
    assert extra["generated_tokens"] is None
    assert extra["engine"] == extra["mode"] == "fast+in_context"
    assert extra["draft_source"] == "base" and extra["draft_ms"] == 12.3 and "alignment" not in extra


def test_the_label_is_built_in_one_place():
    assert refined("ar", in_context=True).label == engine_label("ar", True) == "ar+in_context"
    assert refined("reference").label == "reference"
    assert finish_reason("eos") == "stop"
    assert finish_reason("max_new_tokens") == finish_reason("timeout") == "length"


def test_the_extra_of_a_prediction_and_of_a_bare_base():
    extra = diffpo_extra("tiny", "knob", None, "my guess", refined(alignment={"cache": "hit"}))
    assert extra["draft_source"] == "prediction" and extra["draft_ms"] == 0.0 and extra["draft"] == "my guess"
    assert extra["alignment"] == {"aligner": {"cache": "hit"}}
    both = diffpo_extra("tiny", "knob", draft(alignment={"cache": "miss"}), "Blue.",
                        refined(alignment={"cache": "hit"}))
    assert both["alignment"] == {"base": {"cache": "miss"}, "aligner": {"cache": "hit"}}
    bare = diffpo_extra("tiny", None, draft(), "Blue.")
    assert set(bare) == {"base", "aligner", "draft_source", "draft_ms"} and bare["aligner"] is None


def test_usage():
    assert response_usage(draft(), refined(), False) == {"prompt_tokens": 9, "completion_tokens": 12,
                                                         "total_tokens": 21}
    # a prediction on an aligner route: no base ran, the aligner counted the prompt and the prediction
    u = response_usage(None, refined(prompt_tokens=8, prediction_tokens={"accepted": 10, "rejected": 9}), True)
    assert u == {"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20,
                 "completion_tokens_details": {"accepted_prediction_tokens": 10, "rejected_prediction_tokens": 9}}
    # a bare base: its own counts; a remote endpoint that said nothing leaves the details (and zeros) out
    u = response_usage(draft(prediction_tokens={"accepted": 3, "rejected": 2}), None, True)
    assert u["completion_tokens_details"] == {"accepted_prediction_tokens": 3, "rejected_prediction_tokens": 2}
    u = response_usage(draft(prompt_tokens=None, completion_tokens=None), None, True)
    assert u == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    # counts without a prediction in the request are not reported
    assert "completion_tokens_details" not in response_usage(draft(prediction_tokens={"accepted": 1, "rejected": 0}),
                                                             None, False)


def test_engine_stats_say_only_what_the_engine_computed():
    from pipeline.decoding.continuation import finish
    from pipeline.decoding.jacobi import RefineItem, RefineResult
    from pipeline.decoding.settings import RefineSettings

    jacobi = RefineResult([1, 2, 3, 4, 5], passes=3, converged=False, reserved=0)
    assert engine_stats(jacobi) == {"iterations": 3, "tokens_per_pass": 1.667, "converged": False,
                                    "generated_tokens": None}
    item = RefineItem(prompt_ids=[9, 9], draft_ids=[1, 2, 3], reserved=2)
    cont = finish(item, [5, 6, 0, 7], stop_ids=[0], settings=RefineSettings(max_new_tokens=16))
    assert cont.token_ids == [1, 2, 5, 6]
    assert engine_stats(cont) == {"iterations": None, "tokens_per_pass": None, "converged": None,
                                  "generated_tokens": 3}  # the stop token was generated too


def test_requests_and_replies_survive_pickling():
    """Ray Serve pickles them across handles."""
    for obj in (DraftRequest([{"role": "user", "content": "hi"}], 8, 0.7, 1.0, "k", prediction="p",
                             alignment={"x": 1.0}),
                RefineRequest([{"role": "user", "content": "hi"}], "draft", 8, "k", concurrent=True),
                draft(first_token_ms=3.0), refined("vllm", first_token_ms=4.0)):
        assert pickle.loads(pickle.dumps(obj)) == obj


def test_prediction_usage_counts_on_the_aligners_tokenizer():
    from pipeline.decoding.prediction import prediction_counts, prediction_usage
    from pipeline.prompts import answer_ids, chat_prompt_ids
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()  # one token per character
    msgs = [{"role": "user", "content": "Name a color."}]
    answer = answer_ids(tok, "Blue, like the sea.")
    assert prediction_usage(tok, msgs, None, "Blue", answer_ids(tok, "Blue"), answer) == {}
    # the prediction is the draft: its ids are the draft's
    got = prediction_usage(tok, msgs, "Blue, like the sky.", "Blue, like the sky.", answer_ids(tok, "Blue, li"), answer)
    assert got == {"prediction_tokens": {"accepted": 8, "rejected": 0},
                   "prompt_tokens": len(chat_prompt_ids(tok, msgs))}
    # another draft: the prediction is tokenized on its own
    got = prediction_usage(tok, msgs, "Blue, like the sky.", "Red.", answer_ids(tok, "Red."), answer)
    accepted, rejected = prediction_counts(answer_ids(tok, "Blue, like the sky."), answer)
    assert got["prediction_tokens"] == {"accepted": accepted, "rejected": rejected} and accepted + rejected == 19


def _imports(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=300).stdout.strip()


def test_the_accounting_and_the_replies_import_no_torch_and_vllm_no_in_process_aligner():
    assert _imports("import pipeline.decoding.prediction, serve_app.replies, sys; print('torch' in sys.modules)") \
        == "False"
    assert _imports("import serve_app.vllm, sys; print('serve_app.aligner' in sys.modules, "
                    "'serve_app.bases' in sys.modules)") == "False False"


def test_callers_of_the_llm_server_never_import_vllm():
    """The vLLM adapter deployments and the batch jobs' stage requests speak plain dicts to the LLM server
    (`completions_dict`): building their engine client and a job's request imports no vLLM (each import costs a
    process ~17 s of CPU here)."""
    code = ("import sys\n"
            "from serve_app.vllm import Completions\n"
            "from jobs.common.vllm_stages import _request\n"
            "class Handle:\n"
            "    def options(self, **kw): return self\n"
            "Completions(Handle(), 'm')\n"
            "r = _request({'tokenized_prompt': [1, 2], 'sampling_params': {'max_tokens': 3, 'temperature': 0.0, "
            "'top_p': 1.0, 'seed': 0, 'stop_token_ids': [2]}}, model='m')\n"
            "print('vllm' in sys.modules, r['method'], 'dtype' in r)")
    assert _imports(code) == "False completions_dict False"


class FakeMetric:
    def __init__(self, name):
        self.name, self.seen = name, []

    def observe(self, v):
        self.seen.append(v)

    def inc(self, v, tags=None):
        self.seen.append((v, tags))


@pytest.fixture
def refine_metrics(monkeypatch):
    from serve_app import metrics

    monkeypatch.setattr(metrics, "_counter", lambda name, *a, **k: FakeMetric(name))
    monkeypatch.setattr(metrics, "_histogram", lambda name, *a, **k: FakeMetric(name))
    return metrics.RefineMetrics("m")


def test_each_engine_records_its_own_statistics(refine_metrics):
    m = refine_metrics
    m.record("ok", refined("fast"))
    m.record("ok", refined("vllm"))
    m.record("rejected")
    assert m.iterations.name == "diffpo_jacobi_iterations" and m.iterations.seen == [7]
    assert m.tokens_per_pass.name == "diffpo_tokens_per_pass" and m.tokens_per_pass.seen == [1.714]
    assert m.generated_tokens.name == "diffpo_generated_tokens" and m.generated_tokens.seen == [13]
    assert m.latency.seen == [45.678, 45.678]
    assert m.requests.seen == [(1, {"outcome": "ok"}), (1, {"outcome": "ok"}), (1, {"outcome": "rejected"})]


def test_a_prefix_draft_says_it_is_one_and_no_draft_says_none():
    prefix = diffpo_extra("tiny", "aligner", draft(prefix=True), "Blu", refined("vllm"))
    assert prefix["draft_prefix"] is True and prefix["draft_source"] == "base" and prefix["draft"] == "Blu"
    none = diffpo_extra("tiny", "aligner", draft(text="", prefix=True, drafted=False, draft_ms=0.0), "",
                        refined("vllm"))
    assert none["draft_source"] == "none" and none["draft"] == "" and none["draft_ms"] == 0.0
    whole = diffpo_extra("tiny", "aligner", draft(), "Blue.", refined("fast"))
    assert whole["draft_prefix"] is False
