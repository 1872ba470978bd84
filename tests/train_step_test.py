"""The jitted step against independent goldens: numpy re-derivations of each objective's loss from full logits,
gradient accumulation against one full batch, non-finite skipping, the schedule and the weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import train_common as tc
from tregjax import losses, models
from tregjax.training import config as config_lib
from tregjax.training import optimizer as optimizer_lib
from tregjax.training import step as step_lib


def _model(num_labels=0, seed=0, cfg=None):
  cfg = cfg or models.ModelConfig.tiny_llama(**tc.tiny_config().model.overrides.to_dict(), num_labels=num_labels)
  return models.from_config(cfg, nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)


def _setup(objective="preference", options=None, accum=1, num_labels=0, cfg=None):
  """(model, state, jitted step) with SGD + momentum at lr 1e4.

  Loss metrics are computed before the update, so the optimizer does not matter to the goldens. SGD's first update
  is exactly lr·gradient, so accumulation is checked on gradients (Adam's first update is ±lr·sign(g), which would
  amplify float32 noise on near-zero gradients); lr = 1e4 makes that change far larger than the parameters' own
  float32 spacing, so subtracting them back out adds no rounding of note. Momentum gives the optimizer a state, so a
  skipped update is visible in it too.
  """
  model = _model(num_labels, cfg=cfg)
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  tx = optax.sgd(1e4, momentum=0.9)
  state = step_lib.init_state(params, extra, tx, 0)
  loss_fn = step_lib.make_loss_fn(objective, options, chunk_size=8)
  step = jax.jit(step_lib.make_train_step(graphdef, tx, optax.constant_schedule(1e4), loss_fn, accum))
  return model, state, step


@pytest.fixture(scope="module")
def dpo_treg():
  """DPO + T-REG step, compiled once for the tests below (compilation dominates their run time)."""
  options = losses.ObjectiveOptions(loss="dpo", regularizer="treg", beta=0.1, alpha=0.25)
  return (options,) + _setup("preference", options)


@pytest.fixture(scope="module")
def sft():
  return _setup("sft")


def _batch(n=16, seed=1234):
  return tc.collate(tc.make_pairs(n, seed=seed))


def _np_logps(model, seq):
  """float64 log-softmax of the full [B, T, V] logits, gathered at the labels (the naive path)."""
  logits = np.asarray(model(jnp.asarray(seq.tokens), positions=jnp.asarray(seq.positions),
                            segment_ids=jnp.asarray(seq.segment_ids)), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return np.take_along_axis(logits, seq.labels[..., None], -1)[..., 0] - logz


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def test_preference_step_loss_equals_numpy_dpo_treg_from_full_logits(dpo_treg):
  options, model, state, step = dpo_treg
  batch = _batch()
  _, metrics = step(state, batch)
  c, r = batch.chosen, batch.rejected
  lw, ll = _np_logps(model, c), _np_logps(model, r)
  mw, ml = c.loss_mask.astype(np.float64), r.loss_mask.astype(np.float64)
  sw, sl = (lw * mw).sum(1), (ll * ml).sum(1)
  z = options.beta * ((sw - batch.ref_chosen_logps) - (sl - batch.ref_rejected_logps))
  reg_w = -options.beta * (batch.chosen_token_rewards * lw * mw).sum(1)
  reg_l = -options.beta * (batch.rejected_token_rewards * ll * ml).sum(1)
  weight = 1.0 / (1.0 + np.exp(z))  # sigma(-z), the DPO gradient's own weight
  expected = np.mean(-_log_sigmoid(z) + options.alpha * weight * (reg_w + reg_l))
  np.testing.assert_allclose(float(metrics["loss/total"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss/regularizer"]), np.mean(options.alpha * weight * (reg_w + reg_l)),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(metrics["rewards/accuracy"]), np.mean(z > 0), atol=0)


def _eqns(jaxpr):
  """Every equation of a jaxpr, inside sub-jaxprs (pjit, checkpoint, custom_jvp) too."""
  for e in jaxpr.eqns:
    yield e
    for value in e.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _eqns(inner if hasattr(inner, "eqns") else inner.jaxpr)


def test_unrolled_layer_loop_from_the_config_gives_the_scanned_step(dpo_treg):
  """`config.model.scan_layers=False` reaches the model, whose step (no layer scan left in it) has the loss and
  the update of the scanned step (itself checked against numpy above). Tolerance: loss rtol 1e-5, update
  atol 1e-5·max|update| (the same float32 sums fused differently)."""
  from tregjax.training import model_init  # pylint: disable=g-import-not-at-top
  options, _, state, step = dpo_treg
  cfg = model_init.model_config(tc.tiny_config(**{"model.scan_layers": False}))
  model, unrolled_state, unrolled_step = _setup("preference", options, cfg=cfg)
  tokens = jnp.zeros((1, 4), jnp.int32)
  assert "scan" not in str(jax.make_jaxpr(lambda: model.hidden_states(tokens))())
  assert "scan" in str(jax.make_jaxpr(lambda: _model().hidden_states(tokens))())
  # Per-layer weights come from one split per stacked weight, whose gradient is one concatenate: L slices would
  # give L zero-padded [L, ...] gradients to sum (0.76 s of SmolLM2's 10.3 s CPU step).
  graphdef, params = nnx.split(model)
  grad_jaxpr = jax.make_jaxpr(jax.grad(lambda p: nnx.merge(graphdef, p).hidden_states(tokens).sum()))(params)
  layer_pads = [e for e in _eqns(grad_jaxpr.jaxpr) if e.primitive.name == "pad"
                and tuple(e.params["padding_config"][0][:2]) != (0, 0)]  # padding along the layer axis
  assert not layer_pads and any(e.primitive.name == "concatenate" for e in _eqns(grad_jaxpr.jaxpr))
  batch = _batch()
  (s_scan, m_scan), (s_unrolled, m_unrolled) = step(state, batch), unrolled_step(unrolled_state, batch)
  np.testing.assert_allclose(float(m_unrolled["loss/total"]), float(m_scan["loss/total"]), rtol=1e-5)
  for p0, a, b in zip(*(jax.tree.leaves(s.params) for s in (state, s_scan, s_unrolled))):
    update = np.asarray(a - p0)
    assert np.abs(update).max() > 0
    np.testing.assert_allclose(np.asarray(b - p0), update, rtol=0, atol=1e-5 * np.abs(update).max())


def test_sft_step_loss_is_token_mean_nll_of_chosen(sft):
  model, state, step = sft
  batch = _batch()
  _, metrics = step(state, batch)
  lw = _np_logps(model, batch.chosen)
  m = batch.chosen.loss_mask.astype(np.float64)
  np.testing.assert_allclose(float(metrics["loss/total"]), -(lw * m).sum() / m.sum(), rtol=1e-5)


def test_reward_model_step_is_bradley_terry_on_last_token_scores():
  model, state, step = _setup("reward_model", num_labels=1)
  batch = _batch()
  _, metrics = step(state, batch)

  def last_score(seq):
    scores = np.asarray(model.scores(jnp.asarray(seq.tokens), segment_ids=jnp.asarray(seq.segment_ids)), np.float64)
    last = np.asarray([np.nonzero(row)[0].max() for row in seq.segment_ids])
    return scores[np.arange(len(last)), last]

  margin = last_score(batch.chosen) - last_score(batch.rejected)
  np.testing.assert_allclose(float(metrics["loss/total"]), np.mean(-_log_sigmoid(margin)), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["rewards/accuracy"]), np.mean(margin > 0), atol=0)


def _assert_accumulation_matches(state, step1, step4, skip=()):
  """Tolerance: metrics rtol 2e-6; gradients atol 1e-5·max|g| per tensor. The same float32 sums in another order
  (4 partial sums, then one add); a mean-of-means or a wrong split would be off by percents."""
  batch = _batch(16)
  s1, m1 = step1(state, batch)
  s4, m4 = step4(state, batch)
  for k in m1:
    if not k.startswith(skip):
      np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=2e-6, atol=1e-8, err_msg=k)
  for a, b, p0 in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params), jax.tree.leaves(state.params)):
    g1, g4 = np.asarray(p0 - b), np.asarray(p0 - a)
    assert np.abs(g1).max() > 0
    np.testing.assert_allclose(g4, g1, rtol=0, atol=1e-5 * np.abs(g1).max())


def test_four_micro_batches_of_b_over_4_equal_one_batch_of_b_for_dpo(dpo_treg):
  """token_rewards/* are diagnostics (masked token means): accumulated, they are per-micro-batch means weighted by
  pairs, so they are not compared."""
  options, _, state, step1 = dpo_treg
  _, _, step4 = _setup("preference", options, accum=4)
  _assert_accumulation_matches(state, step1, step4, skip=("token_rewards/",))


def test_sft_accumulation_is_the_global_token_mean_not_a_mean_of_means(sft):
  """Micro-batches hold different numbers of response tokens; the result must still equal the full batch's."""
  _, state, step1 = sft
  _, _, step4 = _setup("sft", accum=4)
  _assert_accumulation_matches(state, step1, step4)


def test_nonfinite_loss_skips_update_and_counts(dpo_treg):
  _, _, state, step = dpo_treg
  batch = _batch()
  bad = batch.replace(ref_chosen_logps=batch.ref_chosen_logps.copy())
  bad.ref_chosen_logps[0] = np.nan
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  s1, m1 = step(state, bad)
  s2, m2 = step(s1, bad)
  after = jax.tree.map(np.asarray, (s2.params, s2.opt_state))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert float(m1["optim/skipped"]) == 1 and int(s2.nonfinite_run) == 2 and int(s2.nonfinite_total) == 2
  s3, m3 = step(s2, batch)
  assert float(m3["optim/skipped"]) == 0 and int(s3.nonfinite_run) == 0 and int(s3.nonfinite_total) == 2
  assert int(s3.step) == 3


def test_warmup_then_cosine_schedule_matches_closed_form():
  opt = config_lib.base_config().optimizer
  opt.lr, opt.warmup_ratio, opt.min_lr_ratio, opt.schedule = 1e-3, 0.1, 0.1, "cosine"
  sched = optimizer_lib.make_schedule(opt, 100)
  for s in (0, 5, 10, 40, 99, 100):
    if s < 10:
      want = 1e-3 * s / 10
    else:
      t = (s - 10) / 90
      want = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    np.testing.assert_allclose(float(sched(s)), want, rtol=1e-5, atol=1e-12)


def test_weight_decay_skips_norms_biases_and_embeddings_unless_asked():
  cfg = models.ModelConfig.tiny_llama(attention_bias=True, tie_word_embeddings=False)
  _, params, _ = nnx.split(models.abstract_model(cfg), nnx.Param, ...)
  flat = lambda m: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(m)[0]}
  mask = flat(optimizer_lib.decay_mask(params, decay_embeddings=False))
  decayed = sorted(k for k, v in mask.items() if v)
  assert decayed == sorted(k for k in mask if any(
      n in k for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")))
  with_embed = flat(optimizer_lib.decay_mask(params, decay_embeddings=True))
  assert [k for k in with_embed if with_embed[k] and not mask[k]] == ["['model']['embed_tokens'].value"]


def test_adamw_update_decays_only_masked_params():
  """One AdamW step from zero gradients: decayed leaves shrink by lr·wd·p, the others do not move."""
  model = _model()
  _, params, _ = nnx.split(model, nnx.Param, ...)
  opt = tc.tiny_config(**{"optimizer.weight_decay": 0.1, "optimizer.warmup_steps": 0,
                          "optimizer.schedule": "constant", "optimizer.lr": 0.5}).optimizer
  tx, _ = optimizer_lib.make_optimizer(opt, 10, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  new = jax.jit(lambda p: optax.apply_updates(p, tx.update(zeros, tx.init(p), p)[0]))(params)
  mask = optimizer_lib.decay_mask(params, False)
  for p, n, m in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(mask)):
    np.testing.assert_allclose(np.asarray(n), np.asarray(p) * (1 - 0.5 * 0.1) if m else np.asarray(p), rtol=1e-6)
