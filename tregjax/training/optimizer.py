"""AdamW with warmup + decay, global-norm clipping and a weight-decay mask, from config.optimizer."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from tregjax import parallel


def warmup_steps(opt: ml_collections.ConfigDict, total_steps: int) -> int:
  return int(opt.warmup_steps) if opt.warmup_steps else int(round(opt.warmup_ratio * total_steps))


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine / linear decay to lr·min_lr_ratio at `total_steps`, or constant."""
  warm = warmup_steps(opt, total_steps)
  decay = max(total_steps - warm, 1)
  end = opt.lr * opt.min_lr_ratio
  if opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(opt.lr, decay, alpha=opt.min_lr_ratio)
  elif opt.schedule == "linear":
    after = optax.linear_schedule(opt.lr, end, decay)
  else:
    after = optax.constant_schedule(opt.lr)
  if not warm:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warm), after], [warm])


def decay_mask(params: Any, decay_embeddings: bool) -> Any:
  """True where weight decay applies: weight matrices, never norm scales or biases, embeddings only if asked.

  Norms are recognised by a "norm" logical axis or path component, biases by a leaf name containing "bias", the
  token table by a path component containing "embed" (tregjax models: `embed_tokens`). Rank alone is not enough:
  stacked layers give norm scales shape [L, D].
  """

  def one(path, leaf):
    names = parallel.path_str(path).lower().split("/")
    axes = leaf.get_metadata().get("axes") or () if isinstance(leaf, nnx.Variable) else ()
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    if "norm" in axes or any("norm" in n for n in names) or (names and "bias" in names[-1]) or np.ndim(value) <= 1:
      decay = False
    elif not decay_embeddings and any("embed" in n for n in names):
      decay = False
    else:
      decay = True
    return leaf.replace(decay) if isinstance(leaf, nnx.Variable) else decay

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain (clip → AdamW) and its schedule; `params` (or their abstract shapes) fix the decay mask."""
  schedule = make_schedule(opt, total_steps)
  mask = decay_mask(params, opt.decay_embeddings)
  parts = []
  if opt.grad_clip:
    parts.append(optax.clip_by_global_norm(opt.grad_clip))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=mask))
  return optax.chain(*parts), schedule


__all__ = ["make_optimizer", "make_schedule", "decay_mask", "warmup_steps"]
