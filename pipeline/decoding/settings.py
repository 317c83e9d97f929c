"""The settings of the two decoding steps: how the aligner computes its answer and how a base model samples its
drafts. Plain dataclasses without torch, so that the configs of the jobs and the Serve app nest them cheaply;
their defaults and their one-line descriptions (read by `--help`) are written here and nowhere else.

The aligner's settings come in three layers, one per kind of engine, so that a config section holds exactly the
keys its engine uses:

* `AnswerSettings`: what every engine needs to compute DiffPO's answer (the cap, the reserved draft tokens and
  their seed): the greedy-continuation engines (`ar`, `vllm`) take only these;
* `JacobiSettings`: + the Jacobi block and its pass limit (the published loop, `reference`);
* `RefineSettings`: + the fast engine's sliding window and re-seeding (`fast`); the engines themselves take this
  type, with the defaults for whatever a section does not have.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field


def setting(default, description: str):
    """A dataclass field with its description (what `--help` prints next to the key)."""
    return field(default=default, metadata={"description": description})


@dataclass
class AnswerSettings:
    """What every aligner engine needs to compute DiffPO's answer."""

    __pydantic_config__ = {"extra": "forbid"}  # read by the configs that nest it: unknown keys are errors

    max_new_tokens: int = setting(256, "answer length cap, reserved draft tokens included")
    reserve_tokens: int = setting(12, "r ~ U{0..reserve_tokens} draft tokens are held fixed; 0 disables")
    seed: int = setting(0, "seeds r per row (with the row key), so batching never changes r")

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.reserve_tokens < 0:
            out.append(f"reserve_tokens must be >= 0 (got {self.reserve_tokens})")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def full(self) -> "RefineSettings":
        """These settings as the engines' type, the keys this layer lacks at their defaults."""
        return RefineSettings(**asdict(self))


def reserve_draw(key: str, seed: int, reserve_tokens: int) -> int:
    """r ~ U{0..reserve_tokens}, deterministic in (seed, row key): known before any draft exists."""
    if reserve_tokens <= 0:
        return 0
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(h).randint(0, reserve_tokens)


def reserve_count(key: str, seed: int, reserve_tokens: int, draft_len: int) -> int:
    """The reserved draft tokens of a row: its draw r, never more than the draft has."""
    return min(reserve_draw(key, seed, reserve_tokens), draft_len)


@dataclass
class JacobiSettings(AnswerSettings):
    """+ the Jacobi block: the published loop (`reference`) and the fast engine."""

    block_size: int = setting(256, "draft tokens per Jacobi block")
    max_iter: int = setting(300, "passes per block before the state is accepted as is (>= block_size+1 always "
                                 "converges)")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.block_size < 1:
            out.append(f"block_size must be >= 1 (got {self.block_size})")
        if self.max_iter < 1:
            out.append(f"max_iter must be >= 1 (got {self.max_iter})")
        return out


@dataclass
class RefineSettings(JacobiSettings):
    """+ the fast engine's window and re-seeding: every setting an engine reads."""

    window: int | None = setting(16, "tokens recomputed past the converged frontier per pass; null = whole block")
    adaptive_window: bool = setting(True, "per row: double the window while all of it is accepted, shrink after "
                                          "a miss")
    reseed: bool = setting(True, "re-align the unconverged state with the draft after an insertion/deletion")
    reseed_ngram: int = setting(3, "longest n-gram matched against the draft when re-aligning")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.window is not None and self.window < 1:
            out.append(f"window must be >= 1 or null (got {self.window})")
        if self.reseed_ngram < 1:
            out.append(f"reseed_ngram must be >= 1 (got {self.reseed_ngram})")
        return out


@dataclass
class SamplingParams:
    """How a base model samples its drafts (nested as `base.sampling` in the jobs and the Serve app)."""

    __pydantic_config__ = {"extra": "forbid"}  # read by the configs that nest it: unknown keys are errors
    max_new_tokens: int = setting(256, "draft length cap (Serve: the most a request's max_tokens gets from this "
                                       "base)")
    temperature: float = setting(0.7, "sampling temperature (Serve: when a request sends none)")
    top_p: float = setting(0.9, "nucleus sampling mass (Serve: when a request sends none)")
    do_sample: bool = setting(True, "false = greedy drafts (Serve: when a request sends no temperature)")
    seed: int = setting(0, "with the row id and turn (Serve: the conversation): a rerun draws the same samples")

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not (0 < self.top_p <= 1 and self.temperature > 0):
            out.append("needs temperature > 0 and 0 < top_p <= 1 (or do_sample=false)")
        return out
