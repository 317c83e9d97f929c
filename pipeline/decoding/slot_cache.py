"""A KV cache with per-row lengths, for batched Jacobi decoding.

transformers' DynamicCache keeps one length for the whole batch and concatenates (copies) every
layer's cache on every forward pass. Jacobi rows advance at different speeds, and only some of the
tokens of a pass become final, so we keep preallocated buffers instead:

- slots [0, T) hold the committed tokens, row b's valid ones being [0, lengths[b]) (the rest of its
  slots are garbage, hidden by the attention mask);
- a forward pass writes its L new tokens at slots [T, T+L) for every row;
- `commit(counts)` moves the first counts[b] new entries of row b to [lengths[b], lengths[b]+counts[b])
  — a few tokens per row, not the whole cache — and drops the rest.

The model sees an ordinary cache of length T, positions come from `position_ids`. A slot is not a position
here (row b's new tokens sit at T, its positions continue at lengths[b]), so the masks say which keys each
query sees: for full causal attention a 2-D validity mask is enough (`attention_mask`: the model turns it
into its causal mask), but a sliding window is counted in positions, so those layers get explicit 4-D masks
built from positions (`layer_mask`).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _SlotLayer(CacheLayerMixin):
    _layer_type = None  # never register this class in transformers' layer-type mapping
    is_sliding = False
    is_compileable = False

    def __init__(self, owner: "SlotCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        cap = self.owner.capacity
        self.keys = key_states.new_zeros((b, h, cap, d))
        self.values = value_states.new_zeros((b, h, cap, value_states.shape[-1]))
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t, n = self.owner.T, key_states.shape[-2]
        if t + n > self.keys.shape[2]:
            raise RuntimeError(f"slot cache overflow: {t}+{n} > capacity {self.keys.shape[2]}")
        self.keys[:, :, t:t + n] = key_states
        self.values[:, :, t:t + n] = value_states
        return self.keys[:, :, :t + n], self.values[:, :, :t + n]

    def get_mask_sizes(self, query_length: int, *args, **kwargs):
        return self.owner.T + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.T

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """Cache for `num_layers` attention layers with `capacity` slots per row. Every layer keeps every committed
    token, sliding-window layers too: their masks, not the cache, hide what lies outside the window."""

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.T = 0  # slots in use (= max committed length over rows)
        self.lengths: list[int] = []  # committed tokens per row
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def after_prefill(self, lengths: list[int]) -> None:
        """The prefill wrote right-padded prompts at [0, max len): row b's valid slots are [0, lengths[b])."""
        self.lengths = list(lengths)
        self.T = max(lengths)

    def commit(self, counts: list[int]) -> None:
        """Keep the first counts[b] tokens of the last pass for each row; forget the rest."""
        t = self.T
        for layer in self.layers:
            for buf in (layer.keys, layer.values):
                for b, c in enumerate(counts):
                    if c:
                        a = self.lengths[b]
                        if a != t:  # source [t, t+c) and target [a, a+c) may overlap
                            buf[b, :, a:a + c] = buf[b, :, t:t + c].clone()
        self.lengths = [a + c for a, c in zip(self.lengths, counts)]
        self.T = max(self.lengths) if self.lengths else 0

    def keep_rows(self, rows: list[int]) -> None:
        """Drop finished rows from the batch (a copy of the buffers; happens once per finished row group)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.layers[0].keys.device)
        for layer in self.layers:
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)
        self.lengths = [self.lengths[i] for i in rows]
        self.T = max(self.lengths) if self.lengths else 0

    def attention_mask(self, query_lengths: list[int], width: int, device) -> torch.Tensor:
        """2-D mask [B, T+width]: each row's committed slots and its first query_lengths[b] new tokens."""
        b = len(self.lengths)
        ar = torch.arange(self.T + width, device=device).expand(b, -1)
        lens = torch.tensor(self.lengths, device=device)[:, None]
        q = torch.tensor(query_lengths, device=device)[:, None]
        valid = (ar < lens) | ((ar >= self.T) & (ar < self.T + q))
        return valid.long()

    def layer_mask(self, width: int, window: int | None, device) -> torch.Tensor:
        """4-D boolean mask [B, 1, width, T+width] of a pass over `width` new tokens per row (True: may attend).

        Row b's committed slot s holds position s and its new slot T+j position lengths[b]+j. A query sees the
        row's committed slots and the new slots up to itself (causal); with a sliding `window` only the keys at
        positions k with q - k < window, as transformers' `sliding_window_overlay` has it: the query itself
        and the window-1 positions before it. Right-padding queries (past a row's real tokens) follow the same
        rule, so no query row is ever fully masked, and causality keeps every real query away from them.
        """
        t = self.T
        lens = torch.tensor(self.lengths, device=device)[:, None, None]
        q_pos = lens + torch.arange(width, device=device)[None, :, None]  # [B, width, 1]
        slot = torch.arange(t + width, device=device)[None, None, :]  # [1, 1, T+width]
        new = slot >= t
        k_pos = torch.where(new, lens + slot - t, slot)  # [B, 1, T+width]
        mask = torch.where(new, k_pos <= q_pos, slot < lens)
        if window is not None:
            mask &= q_pos - k_pos < window
        return mask[:, None]
