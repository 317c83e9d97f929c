"""The settings of the two decoding steps, one type each: how the aligner refines (`RefineSettings`) and how a
base model samples its drafts (`SamplingParams`). Plain dataclasses without torch, so configs (the jobs'
`aligner.refine` / `base.sampling`, the Serve app's `refine`) can nest them cheaply; their defaults are the
defaults everywhere."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RefineSettings:
    """Knobs of the Jacobi refinement. Jobs and the Serve app nest this type as `aligner.refine`, so these
    defaults are the defaults everywhere."""

    __pydantic_config__ = {"extra": "forbid"}  # read by the configs that nest it: unknown keys are errors

    block_size: int = 256  # draft tokens per Jacobi block
    max_iter: int = 300  # passes per block before the state is accepted as is (>= block_size+1 always converges)
    max_new_tokens: int = 256  # answer length cap, reserved draft tokens included
    reserve_tokens: int = 12  # r ~ U{0..reserve_tokens} draft tokens are held fixed; 0 disables
    seed: int = 0  # seeds r per row (with the row key), so batching never changes r
    # fast engine only -------------------------------------------------------------------------
    window: int | None = 16  # tokens recomputed past the converged frontier per pass; None = whole block
    adaptive_window: bool = True  # per row: double the window while all of it is accepted, shrink after a miss
    reseed: bool = True  # re-align the unconverged state with the draft after an insertion/deletion
    reseed_ngram: int = 3  # longest n-gram matched against the draft when re-aligning

    def validate(self) -> None:
        problems = []
        if self.block_size < 1:
            problems.append(f"block_size must be >= 1 (got {self.block_size})")
        if self.max_iter < 1:
            problems.append(f"max_iter must be >= 1 (got {self.max_iter})")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.reserve_tokens < 0:
            problems.append(f"reserve_tokens must be >= 0 (got {self.reserve_tokens})")
        if self.window is not None and self.window < 1:
            problems.append(f"window must be >= 1 or null (got {self.window})")
        if self.reseed_ngram < 1:
            problems.append(f"reseed_ngram must be >= 1 (got {self.reseed_ngram})")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class SamplingParams:
    """How a base model samples its drafts (jobs nest this type as `base.sampling`)."""

    __pydantic_config__ = {"extra": "forbid"}  # read by the configs that nest it: unknown keys are errors
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    do_sample: bool = True  # False = greedy drafts
    seed: int = 0  # with the row id and turn: a rerun draws the same samples
