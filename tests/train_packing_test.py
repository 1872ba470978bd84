"""Packed preference batches in the trainer: a packed batch gives the loss, metrics and gradients of the same pairs
laid out one per row, for every preference loss variant, for sft and for reward_model.

Golden: the unpacked batch (one pair per padded row) through the public loss functions and the model's plain
full-logits forward, i.e. nothing of the step's segment machinery. Packed rows are built with the pipeline's own
`pack_sequences`; a packed batch also carries an all-padding row, which must weigh nothing.
Tolerances (float32): loss rtol 2e-5; gradients atol 1e-6 + rtol 2e-4 (rows of another length sum in another order;
observed: loss within 2e-7 relative, gradients within 4e-7 of the largest gradient).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_common as tc
from tregjax import losses, models
from tregjax.data.batch import PreferenceBatch, SequenceBatch, pack_sequences
from tregjax.training import step as step_lib

UNPACKED_T, PACKED_T, MAX_SEGMENTS = 12, 32, 4
GROUPS = [[0, 1, 2], [3, 4], [5, 6, 7], []]  # pairs per packed row; the last row is padding
CHUNK = 8


def random_pairs(n=8, seed=7, vocab=tc.VOCAB):
  """Random pairs: (prompt + chosen ids, prompt + rejected ids, prompt_len, per-token fields in response coords)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    prompt = rng.integers(3, vocab, int(rng.integers(2, 5)))
    pair = {"prompt_len": len(prompt)}
    for side in ("chosen", "rejected"):
      response = rng.integers(3, vocab, int(rng.integers(1, 7)))
      pair[f"{side}_ids"] = np.concatenate([prompt, response]).astype(np.int32)
      m = len(response)
      pair[f"ref_{side}_token_logps"] = (-np.log(vocab) + 0.3 * rng.standard_normal(m)).astype(np.float32)
      pair[f"{side}_token_rewards"] = (rng.random(m) - 0.5).astype(np.float32)
      # The DPO-implicit ablation's rewards β(log π_dpo − log π_ref) come from another policy: data, like the rest.
      pair[f"{side}_dpo_policy_logps"] = pair[f"ref_{side}_token_logps"] + 0.5 * rng.standard_normal(m).astype(
          np.float32)
    out.append(pair)
  return out


def collate_rows(rows, pairs, length, rewards="contrastive", beta=0.1):
  """PreferenceBatch [len(rows), length]: each row packs the listed pairs back to back; [B] fields are row sums."""
  sides = {"chosen": [], "rejected": []}
  sums = {"chosen": [], "rejected": []}
  for row in rows:
    for side in ("chosen", "rejected"):
      seqs = []
      for i in row:
        p = pairs[i]
        r = p[f"{side}_token_rewards"]
        if rewards == "dpo_implicit":
          r = beta * (p[f"{side}_dpo_policy_logps"] - p[f"ref_{side}_token_logps"])
        seqs.append((p[f"{side}_ids"], p["prompt_len"], {"ref": p[f"ref_{side}_token_logps"], "reward": r}))
      fields, _ = pack_sequences(seqs, length)
      fields.setdefault("ref", np.zeros(length, np.float32))
      fields.setdefault("reward", np.zeros(length, np.float32))
      sides[side].append(fields)
      sums[side].append(sum(float(pairs[i][f"ref_{side}_token_logps"].astype(np.float64).sum()) for i in row))

  def seq(side):
    return SequenceBatch(**{k: np.stack([f[k] for f in sides[side]])
                            for k in ("tokens", "labels", "loss_mask", "segment_ids", "positions")})

  stack = lambda side, k: np.stack([f[k] for f in sides[side]])  # noqa: E731
  return PreferenceBatch(chosen=seq("chosen"), rejected=seq("rejected"),
                         ref_chosen_logps=np.asarray(sums["chosen"], np.float32),
                         ref_rejected_logps=np.asarray(sums["rejected"], np.float32),
                         ref_chosen_token_logps=stack("chosen", "ref"),
                         ref_rejected_token_logps=stack("rejected", "ref"),
                         chosen_token_rewards=stack("chosen", "reward"),
                         rejected_token_rewards=stack("rejected", "reward"))


def _batches(rewards="contrastive"):
  pairs = random_pairs()
  unpacked = collate_rows([[i] for i in range(len(pairs))], pairs, UNPACKED_T, rewards)
  packed = collate_rows(GROUPS, pairs, PACKED_T, rewards)
  return unpacked, packed


def _model(num_labels=0):
  cfg = models.ModelConfig.tiny_llama(**tc.tiny_config().model.overrides.to_dict(), num_labels=num_labels)
  return models.from_config(cfg, nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)


class TokenwiseLM(nnx.Module):
  """A stand-in policy without attention (the model interface: hidden_states / unembed / __call__ / scores).

  Its outputs depend on (token, position) only, so packed and unpacked rows give the same per-token values and the
  comparison isolates the step's per-segment loss arithmetic; it compiles in a fraction of a second, so every loss
  variant can be checked. Attention across segments is checked on the real transformer below.
  """

  def __init__(self, num_labels=0, vocab=tc.VOCAB, width=8, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    self.embed = nnx.Param(jax.random.normal(k[0], (vocab, width)))
    self.pos = nnx.Param(0.5 * jax.random.normal(k[1], (PACKED_T, width)))
    self.out = nnx.Param(jax.random.normal(k[2], (width, vocab)))
    self.score = nnx.Param(jax.random.normal(k[3], (width,)))

  def hidden_states(self, tokens, *, positions=None, segment_ids=None):
    del segment_ids
    positions = jnp.arange(tokens.shape[1])[None] if positions is None else positions
    return jnp.tanh(self.embed[...][tokens] + self.pos[...][positions])

  def unembed(self, hidden):
    return hidden @ self.out[...]

  def __call__(self, tokens, *, positions=None, segment_ids=None):
    return self.unembed(self.hidden_states(tokens, positions=positions, segment_ids=segment_ids))

  def scores(self, tokens, *, positions=None, segment_ids=None):
    return self.hidden_states(tokens, positions=positions, segment_ids=segment_ids) @ self.score[...]

  def sequence_scores(self, tokens, *, segment_ids):
    """Score at each row's last non-padding token (the golden's read, one pair per row)."""
    last = jnp.max(jnp.where(segment_ids != 0, jnp.arange(tokens.shape[1]), 0), axis=1)
    return jnp.take_along_axis(self.scores(tokens), last[:, None], axis=1)[:, 0]


def _plain_logps(model, seq):
  """Full [B, T, V] logits of the plain forward, log-softmax gathered at the labels."""
  logits = model(jnp.asarray(seq.tokens), positions=jnp.asarray(seq.positions),
                 segment_ids=jnp.asarray(seq.segment_ids))
  return losses.token_logps(logits, jnp.asarray(seq.labels))


def _golden_preference(options):
  def loss(model, b):
    out, metrics = losses.preference_objective(
        _plain_logps(model, b.chosen), _plain_logps(model, b.rejected), b.chosen.loss_mask, b.rejected.loss_mask,
        options=options, ref_chosen_logps=b.ref_chosen_logps, ref_rejected_logps=b.ref_rejected_logps,
        ref_chosen_token_logps=b.ref_chosen_token_logps, ref_rejected_token_logps=b.ref_rejected_token_logps,
        chosen_token_rewards=b.chosen_token_rewards, rejected_token_rewards=b.rejected_token_rewards)
    return out, metrics
  return loss


def _packed(loss_fn):
  def loss(model, b):
    total, weight, metrics = loss_fn(model, b)
    return total / weight, (weight, metrics)
  return loss


def _grads(fn, model, batch):
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  f = lambda p: fn(nnx.merge(graphdef, p, extra), batch)  # noqa: E731
  (value, aux), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  return value, aux, grads


def _assert_grads_close(got, want):
  flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  for path, g in flat_got:
    np.testing.assert_allclose(np.asarray(g), np.asarray(flat_want[path]), rtol=2e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


VARIANTS = {
    "dpo": (dict(loss="dpo"), "contrastive"),
    "dpo_label_smoothing": (dict(loss="dpo", label_smoothing=0.1), "contrastive"),
    "ipo": (dict(loss="ipo"), "contrastive"),
    "simpo": (dict(loss="simpo", gamma=0.5), "contrastive"),
    "tgdpo": (dict(loss="tgdpo", tgdpo_alpha=0.5), "contrastive"),
    "dpo_treg_dynamic": (dict(loss="dpo", regularizer="treg", alpha=0.5), "contrastive"),
    "simpo_treg_length_normalised": (dict(loss="simpo", regularizer="treg", alpha=0.5), "contrastive"),
    "ipo_treg": (dict(loss="ipo", regularizer="treg", alpha=0.5), "contrastive"),
    "dpo_treg_static_weight": (dict(loss="dpo", regularizer="treg", weighting="static", alpha=0.5), "contrastive"),
    "dpo_treg_dpo_implicit_rewards": (dict(loss="dpo", regularizer="treg", alpha=0.5), "dpo_implicit"),
    "dpo_sft_ablation": (dict(loss="dpo", regularizer="sft", alpha=0.5), "contrastive"),
}


@pytest.fixture(scope="module")
def lm():
  return _model()


@pytest.fixture(scope="module")
def toy():
  return TokenwiseLM()


def test_packed_rows_hold_the_pairs_of_the_unpacked_batch():
  unpacked, packed = _batches()
  assert packed.chosen.segment_ids.max(axis=1).tolist() == [3, 2, 3, 0]
  # Same response tokens (the loss mask's labels), in the same order, on both layouts.
  for side in ("chosen", "rejected"):
    u, p = getattr(unpacked, side), getattr(packed, side)
    np.testing.assert_array_equal(u.labels[u.loss_mask > 0], p.labels[p.loss_mask > 0])


def test_packed_forward_gives_each_segment_its_unpacked_token_logps(lm):
  """Attention is masked by segment and positions restart: a packed token's log-prob is its unpacked one."""
  unpacked, packed = _batches()
  for side in ("chosen", "rejected"):
    u, p = getattr(unpacked, side), getattr(packed, side)
    got = np.asarray(_plain_logps(lm, p))[p.loss_mask > 0]
    want = np.asarray(_plain_logps(lm, u))[u.loss_mask > 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _check_preference(model, name):
  kwargs, rewards = VARIANTS[name]
  options = losses.ObjectiveOptions(beta=0.1, **kwargs)
  unpacked, packed = _batches(rewards)
  want, want_metrics, want_grads = _grads(_golden_preference(options), model, unpacked)
  loss_fn = step_lib.make_loss_fn("preference", options, CHUNK, max_segments=MAX_SEGMENTS)
  got, (pairs, metrics), grads = _grads(_packed(loss_fn), model, packed)
  assert float(pairs) == 8.0  # real segments, not rows (4) nor slots (16)
  np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
  for k, v in want_metrics.items():
    np.testing.assert_allclose(float(metrics[k]), float(v), rtol=2e-5, atol=1e-6, err_msg=k)
  _assert_grads_close(grads, want_grads)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_packed_preference_loss_and_grads_equal_unpacked(toy, name):
  _check_preference(toy, name)


def test_packed_dpo_treg_on_the_transformer_equals_unpacked(lm):
  """The same through attention, rotary positions and the chunked log-softmax of the real model."""
  _check_preference(lm, "dpo_treg_dynamic")


def test_packed_sft_loss_and_grads_equal_unpacked(toy):
  unpacked, packed = _batches()

  def golden(model, b):
    logps, mask = _plain_logps(model, b.chosen), jnp.asarray(b.chosen.loss_mask)
    return -jnp.sum(logps * mask) / jnp.sum(mask), None

  want, _, want_grads = _grads(golden, toy, unpacked)
  got, (tokens, _), grads = _grads(_packed(step_lib.make_loss_fn("sft", None, CHUNK, MAX_SEGMENTS)), toy, packed)
  assert float(tokens) == float(unpacked.chosen.loss_mask.sum())
  np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
  _assert_grads_close(grads, want_grads)


def test_packed_reward_model_reads_each_segments_last_token():
  model = TokenwiseLM(num_labels=1)
  unpacked, packed = _batches()

  def golden(m, b):  # the model's own last-non-padding-token read, one pair per row
    s_w = m.sequence_scores(jnp.asarray(b.chosen.tokens), segment_ids=jnp.asarray(b.chosen.segment_ids))
    s_l = m.sequence_scores(jnp.asarray(b.rejected.tokens), segment_ids=jnp.asarray(b.rejected.segment_ids))
    return jnp.mean(-jax.nn.log_sigmoid(s_w - s_l)), {"rewards/margin": jnp.mean(s_w - s_l),
                                                      "rewards/chosen": jnp.mean(s_w)}

  want, want_metrics, want_grads = _grads(golden, model, unpacked)
  loss_fn = step_lib.make_loss_fn("reward_model", None, CHUNK, MAX_SEGMENTS)
  got, (pairs, metrics), grads = _grads(_packed(loss_fn), model, packed)
  assert float(pairs) == 8.0
  np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
  for k, v in want_metrics.items():
    np.testing.assert_allclose(float(metrics[k]), float(v), rtol=2e-5, atol=1e-6, err_msg=k)
  _assert_grads_close(grads, want_grads)


def test_rows_with_more_segments_than_the_static_max_are_an_error():
  _, packed = _batches()
  step_lib.check_segments(packed, MAX_SEGMENTS)  # 3 segments fit 4 slots
  with pytest.raises(ValueError, match=r"row 0 holds 3 packed pairs .* max_segments=2; raise config.data"):
    step_lib.check_segments(packed, 2)
  with pytest.raises(ValueError, match=r"row 0 holds 3 packed pairs .* config.data.packing=True"):
    step_lib.check_segments(packed, 1)
  bad = packed.replace(rejected=packed.rejected.replace(segment_ids=np.minimum(packed.rejected.segment_ids, 2)))
  with pytest.raises(ValueError, match=r"row 0 holds 3 chosen but 2 rejected segments"):
    step_lib.check_segments(bad, MAX_SEGMENTS)


def test_pipeline_packing_stops_filling_a_row_at_max_segments():
  from tregjax.data.pipeline import BatchPlan  # pylint: disable=g-import-not-at-top
  lengths = np.random.default_rng(0).integers(3, 9, (50, 2))  # short pairs: ~10 would fit a row of 64
  kwargs = dict(global_batch_size=2, buckets=(64,), seed=0, shuffle=True, packing=True, drop_remainder=False,
                process_index=0, process_count=1)
  free = BatchPlan(lengths, **kwargs)
  capped = BatchPlan(lengths, max_segments=3, **kwargs)
  assert max(len(u) for u in free.units) > 3
  assert max(len(u) for u in capped.units) == 3
  assert sorted(i for u in capped.units for i in u) == list(range(50))  # every pair once
  for u in capped.units:  # and each row still fits
    assert lengths[u, 0].sum() <= 64 and lengths[u, 1].sum() <= 64


def test_unpacked_padding_rows_weigh_nothing(toy):
  """A short final batch (drop_remainder=False) ends in all-padding rows: they are not pairs (loss, grads, count)."""
  pairs = random_pairs()
  options = losses.ObjectiveOptions(beta=0.1, loss="dpo", regularizer="treg", alpha=0.5)
  want, _, want_grads = _grads(_golden_preference(options), toy,
                               collate_rows([[i] for i in range(8)], pairs, UNPACKED_T))
  padded = collate_rows([[i] for i in range(8)] + [[], []], pairs, UNPACKED_T)
  for objective in ("preference", "reward_model"):
    fn = _packed(step_lib.make_loss_fn(objective, options, CHUNK))
    got, (count, _), grads = _grads(fn, toy, padded)
    assert float(count) == 8.0
    if objective == "preference":
      np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
      _assert_grads_close(grads, want_grads)
