"""CLLM-style Jacobi trajectories: the states the aligner's Jacobi loop passes through from a worse answer to
its fixed point, recorded with the batched fast engine (the training data of consistency training)."""
from __future__ import annotations

import pyarrow as pa

# One trajectory as build_states stores it: `from` is the index of the worse state it started from; a request
# that could not be refined has only `from` and `error`.
TRAJECTORY = pa.struct([
    ("from", pa.int64()), ("states", pa.list_(pa.string())), ("state_ids", pa.list_(pa.list_(pa.int64()))),
    ("fixed_point", pa.string()), ("fixed_point_ids", pa.list_(pa.int64())), ("stop", pa.string()),
    ("passes", pa.int64()), ("converged", pa.bool_()), ("error", pa.string())])


def _evenly(xs: list, k: int) -> list:
    """k items of xs evenly spaced, the first and the last always among them (all of xs when k >= len)."""
    if k >= len(xs):
        return list(xs)
    if k <= 1:
        return [xs[-1]]
    return [xs[round(i * (len(xs) - 1) / (k - 1))] for i in range(k)]


def trajectory_settings(block_size: int, max_iter: int, max_new_tokens: int, reserve_tokens: int = 0,
                        seed: int = 0):
    """Fast-engine settings that follow the published Jacobi loop state by state: the whole block is
    recomputed every pass, no adaptive window, no re-seeding from the draft. The KV cache aside, the only
    difference is that a block whose last token is final is closed at once, without the loop's extra pass
    that merely confirms the fixed point."""
    from ..decoding.jacobi import RefineSettings

    return RefineSettings(block_size=block_size, max_iter=max_iter, max_new_tokens=max_new_tokens,
                          reserve_tokens=reserve_tokens, seed=seed, window=None, adaptive_window=False, reseed=False)


def jacobi_trajectories(refiner, requests: list, max_states: int = 8, max_time: float | None = None) -> list[dict]:
    """Run the aligner's Jacobi loop from each request's draft and return the states it passes through.

    `refiner` is a `pipeline.decoding.refiner.Refiner` in fast mode with `trajectory_settings(...)`, so the whole
    batch runs at once with a KV cache and the states are those of the published loop (less its passes that
    only confirm a block). State k is the answer so far + the Jacobi block at pass k (token ids, and as
    text cut at the first stop token):
    state 0 is the draft's first block, the last state is the aligner's fixed point (its greedy answer),
    as in CLLM's Jacobi trajectories. Consecutive equal states are merged and at most `max_states` are
    kept, evenly spaced, the first and the last always. Returns per request {"states", "state_ids",
    "fixed_point", "fixed_point_ids", "stop" ("eos" | "max_new_tokens"), "passes", "converged"}, or
    {"error": reason} for a request that cannot be refined or that the batch's time budget `max_time`
    (seconds, None = no limit; see `Refiner.refine_items`) cut off.
    """
    lm = refiner.lm
    out: list[dict] = [{} for _ in requests]
    items, where = [], []
    for i, r in enumerate(requests):
        try:
            items.append(refiner.encode(r))
            where.append(i)
        except ValueError as e:  # e.g. longer than the aligner's context window
            out[i] = {"error": str(e)[:300]}
    trace: list[list] = [[] for _ in items]
    results = refiner.refine_items(items, trace=trace, max_time=max_time)
    stops = set(lm.stop_ids)
    for i, res, tr in zip(where, results, trace):
        if res.stop == "timeout":
            out[i] = {"error": f"cut off by the time budget of {max_time:g} s for {len(items)} trajectories"}
            continue
        ids = [s[:next((k for k, t in enumerate(s) if t in stops), len(s))] for s in tr] + [list(res.token_ids)]
        merged = [s for k, s in enumerate(ids) if k == 0 or s != ids[k - 1]]
        kept = _evenly(merged, max_states)
        out[i] = {"states": [lm.tokenizer.decode(s, skip_special_tokens=True).strip() for s in kept],
                  "state_ids": kept, "fixed_point": lm.tokenizer.decode(res.token_ids, skip_special_tokens=True).strip(),
                  "fixed_point_ids": list(res.token_ids), "stop": res.stop, "passes": res.passes,
                  "converged": res.converged}
    return out
