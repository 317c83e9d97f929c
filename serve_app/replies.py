"""What the ingress and the model deployments send each other: small dataclasses, in one place.

Requests: the ingress calls a base's ``draft(DraftRequest)`` (or ``draft_stream``) and an aligner's
``refine(RefineRequest)`` (or ``refine_stream``). Replies: a base answers with a `Draft`, an aligner with a
`Refined`. The streaming methods yield ``{"delta": text}`` events while the answer's text grows, then one
``{"result": <Draft | Refined>}`` (read by `serve_app.streaming.Relay`). Ray Serve pickles all of them across
handles: plain dataclasses, no behaviour beyond building the response's fields.

Each engine reports only what it computed (`Refined`): the Jacobi engines (``fast``, ``reference``) their
passes, tokens per pass and convergence; the greedy-continuation engines (``vllm``, ``ar``) the number of
tokens they generated. What an engine did not compute is None (null in the response), never a stand-in
value. `diffpo_extra` builds the response's ``diffpo`` field from these replies, `response_usage` its ``usage``.

Nothing here imports torch or Ray: the ingress and the vLLM adapters read it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.config.stages import engine_label  # noqa: F401 (the label is built there, once)

if TYPE_CHECKING:  # the type only: pipeline.decoding.jacobi imports torch
    from pipeline.decoding.jacobi import RefineResult


# ---- requests --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DraftPrefix:
    """Draft only a prefix: as much as decides the first r tokens of this aligner's answer
    (`pipeline.decoding.draft_prefix`)."""

    model: str  # the aligner's model (its tokenizer reads the prefix)
    trust_remote_code: bool
    tokens: int  # aligner tokens the prefix must reach (r + margin)


@dataclass
class DraftRequest:
    """What a base drafts (or, on a bare route, answers)."""

    messages: list[dict]  # the conversation, ending with the user's turn
    max_tokens: int
    temperature: float
    top_p: float
    key: str  # the conversation key: seeds the base's sampling
    concurrent: bool = False  # the ingress is serving other requests too (opens the batch window)
    prediction: str | None = None  # OpenAI Predicted Outputs text: counted against the answer, never used
    alignment: dict | tuple | None = None  # the base's alignment knobs ({name: λ}; normalized by the base)
    prefix: DraftPrefix | None = None  # draft only what the aligner's answer depends on (vLLM bases)


@dataclass
class RefineRequest:
    """What an aligner refines."""

    messages: list[dict]
    draft: str  # the base's answer, or the client's prediction
    max_tokens: int
    key: str  # the conversation key: seeds the number of reserved draft tokens
    concurrent: bool = False
    prediction: str | None = None  # the client's prediction (then also the draft): counted against the answer
    alignment: dict | None = None  # the aligner's alignment knobs
    count_prompt: bool = False  # report the conversation's prompt tokens (no base ran to count them)


# ---- replies ---------------------------------------------------------------------------------------------
@dataclass
class Draft:
    """A base's answer."""

    text: str
    completion_tokens: int | None  # None: a remote endpoint that did not say
    prompt_tokens: int | None  # None: a remote endpoint that did not say (or not counted yet)
    finish_reason: str  # "stop" | "length"
    draft_ms: float
    batch_size: int = 1  # requests drafted together with this one
    first_token_ms: float | None = None  # time to the first token (vLLM bases)
    prediction_tokens: dict | None = None  # {accepted, rejected}, with a prediction (where the base counts it)
    alignment: dict | None = None  # the knob variant that drafted it (cache outcome, switch time)
    prefix: bool = False  # only the start of a draft: as much as the aligner's answer depends on
    drafted: bool = True  # False: no base call (r = 0: the aligner's answer reads no draft token)


@dataclass
class Refined:
    """An aligner's answer and what its engine can tell about it."""

    text: str
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    refine_ms: float
    batch_size: int  # requests refined together with this one
    engine: str  # fast | reference | ar | vllm
    in_context: bool = False  # the draft was shown in the aligner's prompt
    iterations: int | None = None  # Jacobi passes (Jacobi engines only)
    tokens_per_pass: float | None = None  # answer tokens finalized per Jacobi pass (Jacobi engines only)
    converged: bool | None = None  # every block reached its fixed point (Jacobi engines only)
    generated_tokens: int | None = None  # tokens the engine generated, a stop token included (vllm, ar)
    prediction_tokens: dict | None = None  # {accepted, rejected}, with a prediction
    prompt_tokens: int | None = None  # the conversation's tokens, with a prediction (no base counted them)
    first_token_ms: float | None = None  # time to the first text (streams)
    alignment: dict | None = None  # the knob variant that refined it

    @property
    def label(self) -> str:
        """`engine_label`: the response's ``engine`` (and its old name ``mode``)."""
        return engine_label(self.engine, self.in_context)


def engine_stats(res: RefineResult) -> dict:
    """A `RefineResult`'s statistics as `Refined` fields: the Jacobi ones where a Jacobi engine computed it
    (passes not None), `generated_tokens` where a greedy continuation did; None for what it did not compute."""
    tpp = res.tokens_per_pass
    return {"iterations": res.passes, "tokens_per_pass": None if tpp is None else round(tpp, 3),
            "converged": res.converged, "generated_tokens": res.generated_tokens}


def finish_reason(stop: str) -> str:
    """An engine's stop ("eos", "max_new_tokens", "timeout") as an OpenAI finish reason."""
    return "stop" if stop == "eos" else "length"


# ---- the response ----------------------------------------------------------------------------------------
def diffpo_extra(base: str, aligner: str | None, draft: Draft | None, draft_text: str,
                 refined: Refined | None = None) -> dict:
    """The response's ``diffpo`` field: the route, where the draft came from (`draft` None: the client's
    prediction) and, on an aligner route, the draft and the aligner's statistics. ``engine`` names the aligner's
    engine (``vllm``, ``fast+in_context`` ...); ``mode`` is its old name, kept for clients that read it.
    ``iterations`` / ``tokens_per_pass`` / ``converged`` are null unless a Jacobi engine refined the answer,
    ``generated_tokens`` unless a greedy-continuation engine (vllm, ar) did."""
    source = "prediction" if draft is None else "base" if draft.drafted else "none"
    extra = {"base": base, "aligner": aligner, "draft_source": source,
             "draft_ms": 0.0 if draft is None else round(draft.draft_ms, 1)}
    if draft is not None and draft.alignment:
        extra.setdefault("alignment", {})["base"] = draft.alignment
    if refined is not None:
        if refined.alignment:
            extra.setdefault("alignment", {})["aligner"] = refined.alignment
        extra.update(draft=draft_text, draft_prefix=draft is not None and draft.prefix, iterations=refined.iterations, tokens_per_pass=refined.tokens_per_pass,
                     converged=refined.converged, generated_tokens=refined.generated_tokens,
                     refine_ms=round(refined.refine_ms, 1), engine=refined.label, mode=refined.label,
                     refine_batch_size=refined.batch_size)
    return extra


def response_usage(draft: Draft | None, refined: Refined | None, with_prediction: bool) -> dict:
    """The response's ``usage``: prompt tokens from the base (or, with a prediction on an aligner route, the
    aligner's count), completion tokens of the answer, and the prediction's accepted / rejected tokens when the
    request had one and the answering deployment counted them."""
    result = refined if refined is not None else draft
    prompt_tokens = (draft.prompt_tokens if draft is not None else None) or \
        (refined.prompt_tokens if refined is not None else None) or 0
    completion_tokens = result.completion_tokens or 0
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if with_prediction and result.prediction_tokens is not None:  # None: the base's endpoint did not say
        counts = result.prediction_tokens
        out["completion_tokens_details"] = {"accepted_prediction_tokens": counts["accepted"],
                                            "rejected_prediction_tokens": counts["rejected"]}
    return out
