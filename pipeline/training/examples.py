"""Training examples from the rows `jobs.build_states` writes: which example a row gives in an epoch.

A row holds `messages` (the conversation), `states` (answers ranked worst -> best; the last is the target)
and, when trajectories were recorded, `trajectories` (the aligner's Jacobi passes from a draft to its fixed
point). Every draw is seeded by the row id, the epoch and a seed, so a rerun, a resumed run and any sharding
of the rows over workers give each row the same example in the same epoch.
"""
from __future__ import annotations

import random

from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE
from pipeline.training.consistency import Example, make_example, make_trajectory_example

EXAMPLE_KINDS = ("states", "trajectories", "mixed")


def as_states(x) -> list[str]:
    """The `states` column (list<string>; a pandas batch holds it as an array)."""
    return [str(s) for s in x]


def conversation(x) -> list[dict]:
    """The `messages` column (list<struct<role, content>>) as chat messages."""
    return [{"role": m["role"], "content": m["content"]} for m in x]


def pick_state(row_id: str, epoch: int, seed: int, n_states: int) -> int:
    """Index of the worse state y(t) trained on for this row in this epoch (states[-1] is the target)."""
    return random.Random(f"{seed}:{row_id}:{epoch}").randrange(n_states - 1)


def good_trajectories(x) -> list[dict]:
    """The row's Jacobi trajectories (the `trajectories` column, a list of structs) that can give an example: no
    error, and at least one state before the fixed point."""
    return [t for t in (x if x is not None else []) if not t.get("error") and len(t["state_ids"]) >= 2]


def row_example(row: dict, epoch: int, tokenizer, stop_id: int, pad_id: int, *, kind: str, seed: int,
                max_answer_tokens: int, in_context: bool = False,
                template: str = DEFAULT_CORRECTION_TEMPLATE) -> Example:
    """The example `row` gives in `epoch`. `kind`: `states` — a ranked worse answer -> the target (DiffPO);
    `trajectories` — an intermediate Jacobi state -> the aligner's fixed point (CLLM), or the ranked states
    when the row has no usable trajectory; `mixed` — one or the other by a seeded coin per row and epoch.
    `in_context`: the prompt also shows the state through the correction `template`."""
    if kind not in EXAMPLE_KINDS:
        raise ValueError(f"unknown example kind {kind!r}; choose one of {', '.join(EXAMPLE_KINDS)}")
    states = as_states(row["states"])
    msgs = conversation(row["messages"])
    if kind == "mixed":
        kind = "trajectories" if random.Random(f"{seed}:{row['id']}:{epoch}:kind").random() < 0.5 else "states"
    trs = good_trajectories(row.get("trajectories")) if kind == "trajectories" else []
    if trs:
        rng = random.Random(f"{seed}:{row['id']}:{epoch}:trajectory")
        tr = rng.choice(trs)
        k = rng.randrange(len(tr["state_ids"]) - 1)  # never the fixed point itself (nothing to learn)
        return make_trajectory_example(tokenizer, msgs, tr["fixed_point_ids"], tr["stop"] == "eos", tr["state_ids"][k],
                                       stop_id, pad_id, max_answer_tokens, in_context, states[tr["from"]], template)
    t = pick_state(str(row["id"]), epoch, seed, len(states))
    return make_example(tokenizer, msgs, states[-1], states[t], stop_id, pad_id, max_answer_tokens, in_context,
                        template)
