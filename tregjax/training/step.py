"""The jitted training step: loss functions (one per objective), gradient accumulation, non-finite skipping.

A loss function maps `(model, batch) -> (loss_sum, weight, metrics)`: the weighted sum of the loss over the
micro-batch and its denominator (pairs for preference/reward-model losses, response tokens for SFT). Gradients of
`loss_sum` are summed over micro-batches and divided by the summed weight once, so accumulating 4 micro-batches of B/4
gives the gradient of the full batch of B (the global mean, not a mean of means). Objectives differ only in that
function; the step, optimizer, checkpoints and logging are shared (composition, not subclasses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from tregjax import losses
from tregjax import parallel

# (model, batch, dropout_key=None) -> (loss_sum, weight, metrics); the train step of a model that draws dropout masks
# (LoRA dropout) passes a fresh key per micro-batch, evaluation never. The models get the key only when there is one,
# so a model without dropout needs no `dropout_key` argument.
LossFn = Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def _pair_rows(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
  """[B, ...] × 2 → [2B, ...] with rows (chosen_0, rejected_0, chosen_1, ...).

  Interleaving (rather than concatenating) keeps each pair on the device that holds it when the batch axis is
  sharded, so the joint forward pass needs no data movement.
  """
  return jnp.stack([chosen, rejected], axis=1).reshape((-1,) + chosen.shape[1:])


def _unpair_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  x = x.reshape((-1, 2) + x.shape[1:])
  return x[:, 0], x[:, 1]


def _policy_token_logps(model: nnx.Module, chosen, rejected, chunk_size: int, dropout_key: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array]:
  """One forward over chosen and rejected together; chunked log-softmax (never a [2B, T, V] float32 array)."""
  logps = losses.model_token_logps(model, _pair_rows(chosen.tokens, rejected.tokens),
                                   _pair_rows(chosen.labels, rejected.labels), chunk_size=chunk_size,
                                   positions=_pair_rows(chosen.positions, rejected.positions),
                                   segment_ids=_pair_rows(chosen.segment_ids, rejected.segment_ids),
                                   **_dropout(dropout_key))
  return _unpair_rows(logps)


def _dropout(key: jax.Array | None) -> dict[str, jax.Array]:
  return {} if key is None else {"dropout_key": key}


def _segment_slots(segment_ids: jax.Array, max_segments: int) -> jax.Array:
  """bool [B, K, T]: slot k of row b holds the positions of segment k + 1 (padding, id 0, belongs to none)."""
  ids = jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype)
  return segment_ids[:, None, :] == ids[None, :, None]


def _per_pair(x: jax.Array, slots: jax.Array) -> jax.Array:
  """[B, T] → [B·K, T]: one row per segment slot, zero outside its segment.

  Every per-pair quantity of a packed row (sums, length-normalised means, TGDPO's guided sums, the T-REG regulariser
  and its per-pair weight) then comes out of the unchanged [B, T] loss functions as a per-row value, i.e. per pair.
  Costs K copies of the [B, T] float arrays, the same as a one-hot [B, T, K] contraction.
  """
  b, k, t = slots.shape
  return jnp.where(slots, x[:, None, :], jnp.zeros((), x.dtype)).reshape(b * k, t)


def _pair_slots(batch, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(chosen slots [B, K, T], rejected slots [B, K, T], real-pair mask [B·K]).

  A slot is a real pair when both sides hold its segment; rows of padding (a short final batch) hold none.
  """
  slots_w = _segment_slots(batch.chosen.segment_ids, max_segments)
  slots_l = _segment_slots(batch.rejected.segment_ids, max_segments)
  real = jnp.any(slots_w, axis=-1) & jnp.any(slots_l, axis=-1)
  return slots_w, slots_l, real.reshape(-1)


def preference_loss(options: losses.ObjectiveOptions, chunk_size: int, max_segments: int = 1) -> LossFn:
  """DPO / IPO / SimPO / TGDPO (+ T-REG) against the cached reference log-probs and token rewards.

  Rows may be packed (`max_segments` > 1: up to that many pairs per row, `segment_ids` 1..k): the loss is computed
  per pair (segment) and averaged over real pairs, exactly as if each pair had its own row.
  """

  def loss_fn(model, batch, dropout_key=None):
    pi_w, pi_l = _policy_token_logps(model, batch.chosen, batch.rejected, chunk_size, dropout_key)
    slots_w, slots_l, real = _pair_slots(batch, max_segments)
    w = lambda x: _per_pair(x, slots_w)  # noqa: E731
    l = lambda x: _per_pair(x, slots_l)  # noqa: E731
    # Packed rows' [B] reference fields are row sums: take per-pair sums of the per-token ones instead.
    one = max_segments == 1
    loss, metrics = losses.preference_objective(
        w(pi_w), l(pi_l), w(batch.chosen.loss_mask), l(batch.rejected.loss_mask), options=options,
        ref_chosen_logps=batch.ref_chosen_logps if one else None,
        ref_rejected_logps=batch.ref_rejected_logps if one else None,
        ref_chosen_token_logps=w(batch.ref_chosen_token_logps),
        ref_rejected_token_logps=l(batch.ref_rejected_token_logps),
        chosen_token_rewards=w(batch.chosen_token_rewards), rejected_token_rewards=l(batch.rejected_token_rewards),
        pair_mask=real)
    pairs = jnp.sum(real.astype(jnp.float32))
    return loss * pairs, pairs, metrics

  return loss_fn


def sft_loss(chunk_size: int) -> LossFn:
  """Next-token negative log-likelihood of the chosen response, averaged over response tokens.

  Packing-agnostic: labels never cross a segment and attention is masked by `segment_ids`, so a packed row's
  token sum is the sum over its sequences.
  """

  def loss_fn(model, batch, dropout_key=None):
    seq = batch.chosen
    logps = losses.model_token_logps(model, seq.tokens, seq.labels, chunk_size=chunk_size, positions=seq.positions,
                                     segment_ids=seq.segment_ids, **_dropout(dropout_key))
    mask = seq.loss_mask.astype(jnp.float32)
    nll_sum = -jnp.sum(logps * mask)
    tokens = jnp.sum(mask)
    mean = nll_sum / jnp.maximum(tokens, 1.0)
    return nll_sum, tokens, {"loss/total": mean, "loss/sft": mean, "logps/chosen_per_token": -mean}

  return loss_fn


def reward_model_loss(max_segments: int = 1) -> LossFn:
  """Bradley-Terry: −log σ(r(x, y_w) − r(x, y_l)) on the sequence-classification head's score at each sequence's
  last token (per segment of a packed row), averaged over real pairs."""

  def loss_fn(model, batch, dropout_key=None):  # no dropout: LoRA, its only user, is refused for this head
    c, r = batch.chosen, batch.rejected
    scores = model.scores(_pair_rows(c.tokens, r.tokens), positions=_pair_rows(c.positions, r.positions),
                          segment_ids=_pair_rows(c.segment_ids, r.segment_ids))
    if scores.ndim != 2:
      raise ValueError(f"objective=reward_model needs a 1-label score head; scores have shape {list(scores.shape)}")
    slots_w, slots_l, real = _pair_slots(batch, max_segments)

    def at_last(s, slots):  # [B, T] scores → [B·K] at each segment's last position (0 for an empty slot)
      last = jnp.max(jnp.where(slots, jnp.arange(slots.shape[-1]), 0), axis=-1)
      return jnp.take_along_axis(s.astype(jnp.float32), last, axis=1).reshape(-1)

    s_all_w, s_all_l = _unpair_rows(scores)
    s_w, s_l = at_last(s_all_w, slots_w), at_last(s_all_l, slots_l)
    margin = s_w - s_l
    pairs = jnp.sum(real.astype(jnp.float32))
    total = lambda x: jnp.sum(jnp.where(real, x, 0.0))  # noqa: E731
    mean = lambda x: total(x) / jnp.maximum(pairs, 1.0)  # noqa: E731
    per_example = -jax.nn.log_sigmoid(margin)
    metrics = {"loss/total": mean(per_example), "rewards/chosen": mean(s_w), "rewards/rejected": mean(s_l),
               "rewards/margin": mean(margin), "rewards/accuracy": mean((margin > 0).astype(jnp.float32))}
    return total(per_example), pairs, metrics

  return loss_fn


def make_loss_fn(objective: str, options: losses.ObjectiveOptions | None, chunk_size: int,
                 max_segments: int = 1) -> LossFn:
  """The objective's loss; `max_segments` > 1 for packed rows (pairs per row at most; see `check_segments`)."""
  if max_segments < 1:
    raise ValueError(f"max_segments must be >= 1, got {max_segments}")
  if objective == "preference":
    return preference_loss(options, chunk_size, max_segments)
  if objective == "sft":
    return sft_loss(chunk_size)
  if objective == "reward_model":
    return reward_model_loss(max_segments)
  raise ValueError(f"unknown objective {objective!r}")


def check_segments(batch, max_segments: int, where: str = "batch") -> None:
  """Host-side check of a (numpy) batch before it reaches the jitted step, whose segment slots are static.

  A row with more segments than `max_segments` would silently lose pairs, and chosen/rejected rows holding a
  different number of segments would pair the wrong sequences: both are errors naming the row.
  """
  counts = {}
  for side in ("chosen", "rejected"):
    seg = np.asarray(getattr(batch, side).segment_ids)
    if seg.ndim != 2:
      raise ValueError(f"{where}: {side}.segment_ids must be [B, T], got shape {list(seg.shape)}")
    counts[side] = seg.max(axis=1, initial=0)
  counts_w, counts_l = counts["chosen"], counts["rejected"]
  if counts_w.shape != counts_l.shape:
    raise ValueError(f"{where}: chosen has {counts_w.shape[0]} rows, rejected {counts_l.shape[0]}")
  bad = np.flatnonzero(counts_w != counts_l)
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"{where}: row {i} holds {counts_w[i]} chosen but {counts_l[i]} rejected segments "
                     "(packed chosen and rejected rows must hold the same pairs in the same order)")
  over = np.flatnonzero(counts_w > max_segments)
  if over.size:
    i = int(over[0])
    hint = ("raise config.data.max_segments" if max_segments > 1 else
            "packed rows need config.data.packing=True (and config.data.max_segments)")
    raise ValueError(f"{where}: row {i} holds {counts_w[i]} packed pairs (segment_ids up to {counts_w[i]}), more "
                     f"than the step's static max_segments={max_segments}; {hint}")


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; saved whole in checkpoints. Params and optimizer state are float32."""
  step: jax.Array  # i32[]: optimizer steps taken (including skipped ones: a skipped step still consumed its batch)
  params: nnx.State  # the trainable nnx.Param leaves
  extra: nnx.State  # the model's other variables (not trained)
  opt_state: Any
  rng: jax.Array  # u32[2]: raw key data, advanced every step
  nonfinite_run: jax.Array  # i32[]: consecutive steps skipped for a non-finite loss or gradient
  nonfinite_total: jax.Array  # i32[]


def init_state(params: nnx.State, extra: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, extra=extra, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)), nonfinite_run=jnp.zeros((), jnp.int32),
                    nonfinite_total=jnp.zeros((), jnp.int32))


def state_shardings(abstract_state: TrainState, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """Shardings for every TrainState leaf: params by their logical axes, Adam moments like their params."""
  replicated = parallel.sharding_for(None, (), mesh)
  param_sh = parallel.state_shardings(abstract_state.params, mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, param_sh,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
  return TrainState(step=replicated, params=param_sh, extra=parallel.state_shardings(abstract_state.extra, mesh),
                    opt_state=opt_sh, rng=replicated, nonfinite_run=replicated, nonfinite_total=replicated)


def _split_micro(x: jax.Array, accum: int, mesh: Mesh | None) -> jax.Array:
  """[B, ...] → [A, B/A, ...] with micro-batch a = rows {a, A + a, 2A + a, ...}.

  Strided (not contiguous) micro-batches keep every device busy in every micro-step: each device's contiguous slice
  of the batch contributes B/(A·devices) rows to each micro-batch.
  """
  y = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
  if mesh is not None and mesh.size > 1:
    y = jax.lax.with_sharding_constraint(
        y, parallel.sharding_for((None, "batch") + (None,) * (y.ndim - 2), y.shape, mesh))
  return y


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_fn: LossFn, accum_steps: int = 1, mesh: Mesh | None = None,
                    update_mask: nnx.State | None = None, dropout: bool = False
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """The pure step `(state, batch) -> (state, metrics)`; jit it with shardings (see `Trainer`).

  `update_mask` (training.partition): 0/1 per layer of parameters frozen in some layers only; their gradients and
  updates are multiplied by it. `dropout`: the model draws dropout masks (LoRA dropout > 0), so the loss gets a key.
  """
  masked = lambda tree: tree if update_mask is None else jax.tree.map(jnp.multiply, tree, update_mask)  # noqa: E731

  def grads_of(params, extra, micro, dropout_key):
    def f(p):
      loss_sum, weight, metrics = loss_fn(nnx.merge(graphdef, p, extra), micro, dropout_key)
      return loss_sum, (weight, metrics)

    (loss_sum, (weight, metrics)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return grads, loss_sum, weight, metrics

  def step(state: TrainState, batch) -> tuple[TrainState, dict]:
    # The carried key advances as before; the split's other half is this step's dropout key (micro-batch a folds
    # in a), so a resumed run draws the same masks and the stream does not depend on the mesh.
    rng, dropout_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    dropout_key = dropout_key if dropout else None
    if accum_steps == 1:
      grads, loss_sum, weight, metrics = grads_of(state.params, state.extra, batch, dropout_key)
    else:
      micro = jax.tree.map(lambda x: _split_micro(x, accum_steps, mesh), batch)

      def body(carry, xs):
        mb, a = xs
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, a)
        g, ls, w, m = grads_of(state.params, state.extra, mb, key)
        m = {k: v * w for k, v in m.items()}  # metrics are micro-batch means: re-weight to sums
        return jax.tree.map(jnp.add, carry, (g, ls, w, m)), None

      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(grads_of, state.params, state.extra, first, dropout_key)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
      (grads, loss_sum, weight, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
      metrics = {k: v / weight for k, v in metrics.items()}
    grads = masked(jax.tree.map(lambda g: g / weight, grads))
    loss = loss_sum / weight
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    updates = masked(updates)  # weight decay too: a frozen layer does not move at all
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    run = jnp.where(finite, 0, state.nonfinite_run + 1)
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
        rng=jax.random.key_data(rng), nonfinite_run=run,
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics = dict(metrics)
    # The step's denominator: real pairs (preference, reward_model; packed rows count every segment) or response
    # tokens (sft), over all micro-batches and processes.
    metrics.update({"data/loss_weight": weight, "optim/grad_norm": grad_norm, "optim/lr": schedule(state.step),
                    "optim/skipped": (~finite).astype(jnp.float32), "optim/nonfinite_run": run})
    return new_state, metrics

  return step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn) -> Callable[[nnx.State, nnx.State, Any], tuple]:
  """`(params, extra, batch) -> (weight, weighted metric sums)`, to average over a whole split."""

  def step(params, extra, batch):
    _, weight, metrics = loss_fn(nnx.merge(graphdef, params, extra), batch)
    return weight, {k: v * weight for k, v in metrics.items()}

  return step
