"""Typed batches shared by the pipeline, the scorer and the trainer (see `contracts.md`, token alignment).

A sequence row is prompt ids followed by response ids (+ end-of-turn), right-padded. `labels[t] = tokens[t + 1]`
(last position: pad), `loss_mask[t] = 1` iff `labels[t]` is a response token. Per-token arrays (reference token
log-probs, token rewards) are aligned with `labels` and are 0 off the mask. `segment_ids` is 1 on real tokens and 0 on
padding (packed rows: 1..k, one id per sequence); `positions` restart at 0 for each segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import numpy as np


@flax.struct.dataclass
class SequenceBatch:
  """One side (chosen or rejected) of a preference batch; all fields [B, T], right-padded."""
  tokens: np.ndarray  # i32[B, T]
  labels: np.ndarray  # i32[B, T]  tokens shifted left by one
  loss_mask: np.ndarray  # f32[B, T]  1 where labels[t] is a response token
  segment_ids: np.ndarray  # i32[B, T]  0 = padding
  positions: np.ndarray  # i32[B, T]  restart at 0 per segment


@flax.struct.dataclass
class PreferenceBatch:
  """Chosen and rejected rows share T so they concatenate on the batch axis for one forward pass.

  Reference and reward fields are zeros when the source has none (SFT / reward-model training on unscored data).
  With packing, the [B] fields hold row sums; per-sequence values come from the [B, T] fields and `segment_ids`.
  """
  chosen: SequenceBatch
  rejected: SequenceBatch
  ref_chosen_logps: np.ndarray  # f32[B]
  ref_rejected_logps: np.ndarray  # f32[B]
  ref_chosen_token_logps: np.ndarray  # f32[B, T]
  ref_rejected_token_logps: np.ndarray  # f32[B, T]
  chosen_token_rewards: np.ndarray  # f32[B, T]
  rejected_token_rewards: np.ndarray  # f32[B, T]


def pack_sequences(sequences: Sequence[tuple[np.ndarray, int, dict[str, np.ndarray]]], length: int,
                   pad_id: int = 0) -> tuple[dict[str, np.ndarray], list[int]]:
  """Lay out one row of length `length` holding `sequences` back to back.

  Each sequence is `(ids, prompt_len, per_token)` where `ids` = prompt + response ids and `per_token` maps a name to
  an array over the response tokens (len(ids) - prompt_len values, response coordinates). Returns the row's
  tokens/labels/loss_mask/segment_ids/positions (+ each per-token name, label-aligned) and the start offsets.
  Labels never cross a segment boundary: the last token of a segment has label `pad_id` and mask 0.
  """
  tokens = np.full(length, pad_id, np.int32)
  labels = np.full(length, pad_id, np.int32)
  loss_mask = np.zeros(length, np.float32)
  segment_ids = np.zeros(length, np.int32)
  positions = np.zeros(length, np.int32)
  extra: dict[str, np.ndarray] = {}
  offsets, offset = [], 0
  for k, (ids, prompt_len, per_token) in enumerate(sequences):
    n = len(ids)
    if offset + n > length:
      raise ValueError(f"sequences of total length {offset + n} do not fit a row of length {length}")
    if not 0 < prompt_len < n:
      raise ValueError(f"prompt_len={prompt_len} must leave at least one response token in a sequence of {n}")
    offsets.append(offset)
    tokens[offset:offset + n] = ids
    labels[offset:offset + n - 1] = ids[1:]
    # labels[t] is response token j = t + 1 - prompt_len for t in [prompt_len - 1, n - 1).
    loss_mask[offset + prompt_len - 1:offset + n - 1] = 1.0
    segment_ids[offset:offset + n] = k + 1
    positions[offset:offset + n] = np.arange(n)
    for name, values in per_token.items():
      if len(values) != n - prompt_len:
        raise ValueError(f"per-token field {name!r} has {len(values)} values for {n - prompt_len} response tokens")
      row = extra.setdefault(name, np.zeros(length, np.float32))
      row[offset + prompt_len - 1:offset + n - 1] = values
    offset += n
  out = dict(tokens=tokens, labels=labels, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions)
  out.update(extra)
  return out, offsets
