"""tregjax.losses against independent goldens: numpy re-derivations, naive loops and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tregjax import losses

RNG = np.random.default_rng(0)


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_token_logps(logits, labels):
  logits = logits.astype(np.float64)
  lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  return np.take_along_axis(logits, labels[..., None], -1)[..., 0] - lse


def random_masks(b, t, rng=RNG):
  """Response masks: a contiguous run after a random prompt length, then padding."""
  mask = np.zeros((b, t), bool)
  for i in range(b):
    start = rng.integers(0, t // 2)
    end = rng.integers(start + 1, t + 1)
    mask[i, start:end] = True
  return mask


def pair_inputs(b=4, t=9, seed=1):
  rng = np.random.default_rng(seed)
  d = dict(
      pi_w=rng.normal(-2.0, 1.0, (b, t)).astype(np.float32),
      pi_l=rng.normal(-2.0, 1.0, (b, t)).astype(np.float32),
      ref_w=rng.normal(-2.0, 1.0, (b, t)).astype(np.float32),
      ref_l=rng.normal(-2.0, 1.0, (b, t)).astype(np.float32),
      r_w=rng.uniform(-0.5, 0.5, (b, t)).astype(np.float32),
      r_l=rng.uniform(-0.5, 0.5, (b, t)).astype(np.float32),
      m_w=random_masks(b, t, rng),
      m_l=random_masks(b, t, rng),
  )
  d["r_w"] *= d["m_w"]
  d["r_l"] *= d["m_l"]
  return d


def objective(d, **options):
  return losses.preference_objective(
      jnp.asarray(d["pi_w"]), jnp.asarray(d["pi_l"]), d["m_w"], d["m_l"],
      options=losses.ObjectiveOptions(**options),
      ref_chosen_logps=np.sum(d["ref_w"] * d["m_w"], -1), ref_rejected_logps=np.sum(d["ref_l"] * d["m_l"], -1),
      ref_chosen_token_logps=d["ref_w"], ref_rejected_token_logps=d["ref_l"],
      chosen_token_rewards=d["r_w"], rejected_token_rewards=d["r_l"])


# --- log-probs ---------------------------------------------------------------------------------------------------


def test_token_logps_equals_numpy_log_softmax():
  logits = RNG.normal(size=(2, 5, 13)).astype(np.float32) * 3
  labels = RNG.integers(0, 13, (2, 5))
  np.testing.assert_allclose(losses.token_logps(logits, labels), np_token_logps(logits, labels), rtol=1e-5, atol=1e-5)


def test_token_logps_of_bfloat16_logits_is_float32():
  logits = jnp.asarray(RNG.normal(size=(2, 3, 7)), jnp.bfloat16)
  out = losses.token_logps(logits, jnp.zeros((2, 3), jnp.int32))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np_token_logps(np.asarray(logits, np.float32), np.zeros((2, 3), int)), atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_token_logps_equals_full_in_value_and_gradient(chunk_size, softcap):
  b, t, d, v = 2, 13, 8, 37
  hidden = jnp.asarray(RNG.normal(size=(b, t, d)), jnp.float32)
  w = jnp.asarray(RNG.normal(size=(d, v)), jnp.float32)
  labels = jnp.asarray(RNG.integers(0, v, (b, t)))
  weights = jnp.asarray(RNG.normal(size=(b, t)), jnp.float32)

  def unembed_with(w):
    def unembed(h):
      logits = h @ w
      return logits if softcap is None else softcap * jnp.tanh(logits / softcap)
    return unembed

  def full(hidden, w):
    return jnp.sum(weights * losses.token_logps(unembed_with(w)(hidden), labels))

  def chunked(hidden, w):
    return jnp.sum(weights * losses.chunked_token_logps(hidden, labels, unembed_with(w), chunk_size=chunk_size))

  np.testing.assert_allclose(chunked(hidden, w), full(hidden, w), rtol=1e-5)
  for g_chunked, g_full in zip(jax.grad(chunked, (0, 1))(hidden, w), jax.grad(full, (0, 1))(hidden, w)):
    np.testing.assert_allclose(g_chunked, g_full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length,chunk_size,chunk", [(168, 128, 84), (13, 4, 4), (13, 7, 7), (12, 5, 4),
                                                     (5, 64, 5)])
def test_chunked_token_logps_balances_its_chunks(length, chunk_size, chunk):
  """ceil(T / chunk_size) chunks of equal size (hand-computed): at chunk_size 128 a 168-token row is 2 chunks of 84,
  not 2 of 128 (256 positions through the LM head for 168)."""
  seen = set()

  def unembed(h):
    seen.add(h.shape)
    return h @ jnp.ones((3, 11), jnp.float32)

  hidden = jnp.ones((2, length, 3), jnp.float32)
  labels = jnp.zeros((2, length), jnp.int32)
  out = jax.grad(lambda h: losses.chunked_token_logps(h, labels, unembed, chunk_size=chunk_size).sum())(hidden)
  assert out.shape == hidden.shape
  assert seen == {(2, chunk, 3)}


def test_chunked_token_logps_never_holds_full_logits():
  """XLA's own accounting: the chunked loss+grad needs ≤ 25% of the full path's temporary memory."""
  b, t, d, v = 2, 1024, 64, 32000
  hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  labels = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def full(hidden, w, labels):
    return jnp.sum(losses.token_logps(hidden @ w, labels))

  def chunked(hidden, w, labels):
    return jnp.sum(losses.chunked_token_logps(hidden, labels, lambda h: h @ w, chunk_size=64))

  def temp_bytes(fn):
    compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(hidden, w, labels).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full_bytes, chunked_bytes = temp_bytes(full), temp_bytes(chunked)
  assert full_bytes >= b * t * v * 4  # the full path really holds [B, T, V] f32
  assert chunked_bytes <= 0.25 * full_bytes, (chunked_bytes, full_bytes)


def test_sequence_logps_sum_and_mean_over_mask():
  x = RNG.normal(size=(3, 6)).astype(np.float32)
  m = random_masks(3, 6)
  np.testing.assert_allclose(losses.sequence_logps(x, m), (x * m).sum(-1), rtol=1e-6)
  np.testing.assert_allclose(losses.sequence_logps(x, m, average=True), (x * m).sum(-1) / m.sum(-1), rtol=1e-6)


# --- sequence-level losses ---------------------------------------------------------------------------------------


def test_dpo_loss_matches_numpy_with_label_smoothing():
  pi_w, pi_l, ref_w, ref_l = (RNG.normal(size=5).astype(np.float32) * 4 for _ in range(4))
  beta, eps = 0.3, 0.1
  z = beta * ((pi_w - ref_w) - (pi_l - ref_l))
  out = losses.dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta, label_smoothing=eps)
  np.testing.assert_allclose(out.loss, -(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z), rtol=1e-5)
  np.testing.assert_allclose(out.logits, z, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.chosen_rewards, beta * (pi_w - ref_w), rtol=1e-6)
  np.testing.assert_allclose(out.rejected_rewards, beta * (pi_l - ref_l), rtol=1e-6)


def test_dpo_loss_is_log2_when_margin_is_zero():
  x = jnp.asarray([-3.0, -7.0])
  np.testing.assert_allclose(losses.dpo_loss(x, x, x, x, beta=0.1).loss, np.log(2.0), rtol=1e-6)


def test_ipo_loss_matches_numpy():
  pi_w, pi_l, ref_w, ref_l = (RNG.normal(size=5).astype(np.float32) for _ in range(4))
  beta = 0.5
  h = (pi_w - ref_w) - (pi_l - ref_l)
  out = losses.ipo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta)
  np.testing.assert_allclose(out.loss, (h - 1 / (2 * beta))**2, rtol=1e-5)


def test_simpo_loss_matches_numpy():
  avg_w, avg_l = RNG.normal(size=5).astype(np.float32), RNG.normal(size=5).astype(np.float32)
  beta, gamma = 2.5, 1.4
  z = beta * avg_w - beta * avg_l - gamma
  out = losses.simpo_loss(avg_w, avg_l, beta=beta, gamma=gamma)
  np.testing.assert_allclose(out.loss, -np_log_sigmoid(z), rtol=1e-5)
  np.testing.assert_allclose(out.chosen_rewards, beta * avg_w, rtol=1e-6)


# --- token-level rewards -----------------------------------------------------------------------------------------


def test_contrastive_token_rewards_match_numpy_and_vanish_off_mask():
  better, worse = RNG.normal(size=(3, 8)), RNG.normal(size=(3, 8))
  m = random_masks(3, 8)
  out = np.asarray(losses.contrastive_token_rewards(better, worse, m))
  np.testing.assert_allclose(out, np.where(m, np_sigmoid(better - worse) - 0.5, 0.0), rtol=1e-5, atol=1e-7)
  assert np.all(np.abs(out) <= 0.5)


def test_token_regularizer_matches_numpy_sum_and_mean():
  d = pair_inputs()
  beta = 0.7
  expected = -beta * np.sum(d["r_w"] * d["pi_w"] * d["m_w"], -1)
  np.testing.assert_allclose(losses.token_regularizer(d["pi_w"], d["r_w"], d["m_w"], beta=beta), expected, rtol=1e-5)
  np.testing.assert_allclose(losses.token_regularizer(d["pi_w"], d["r_w"], d["m_w"], beta=beta, normalize=True),
                             expected / d["m_w"].sum(-1), rtol=1e-5)


def test_tgdpo_loss_matches_numpy():
  d = pair_inputs()
  beta, alpha = 0.1, 0.5
  zw = np.sum(beta * (1 + alpha * d["r_w"]) * (d["pi_w"] - d["ref_w"]) * d["m_w"], -1)
  zl = np.sum(beta * (1 - alpha * d["r_l"]) * (d["pi_l"] - d["ref_l"]) * d["m_l"], -1)
  out = losses.tgdpo_loss(d["pi_w"], d["pi_l"], d["ref_w"], d["ref_l"], d["r_w"], d["r_l"], d["m_w"], d["m_l"],
                          beta=beta, alpha=alpha)
  np.testing.assert_allclose(out.loss, -np_log_sigmoid(zw - zl), rtol=1e-5)
  np.testing.assert_allclose(out.logits, zw - zl, rtol=1e-4, atol=1e-6)


def test_tgdpo_with_zero_token_rewards_equals_dpo():
  d = pair_inputs()
  zeros = np.zeros_like(d["r_w"])
  tg = losses.tgdpo_loss(d["pi_w"], d["pi_l"], d["ref_w"], d["ref_l"], zeros, zeros, d["m_w"], d["m_l"], beta=0.2,
                         alpha=0.5)
  s = lambda x, m: np.sum(x * m, -1)
  dpo = losses.dpo_loss(s(d["pi_w"], d["m_w"]), s(d["pi_l"], d["m_l"]), s(d["ref_w"], d["m_w"]),
                        s(d["ref_l"], d["m_l"]), beta=0.2)
  np.testing.assert_allclose(tg.loss, dpo.loss, rtol=1e-5)


def test_r3hf_rewards_equal_naive_differences_and_telescope():
  b, t = 4, 10
  scores = RNG.normal(size=(b, t)).astype(np.float32)
  initial = RNG.normal(size=b).astype(np.float32)
  m = random_masks(b, t)
  out = np.asarray(losses.r3hf_token_rewards(scores, m, initial))
  expected = np.zeros((b, t))
  for i in range(b):
    previous = initial[i]
    for j in range(t):
      if m[i, j]:
        expected[i, j] = scores[i, j] - previous
        previous = scores[i, j]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  last = np.array([scores[i, np.nonzero(m[i])[0][-1]] for i in range(b)])
  np.testing.assert_allclose(out.sum(-1), last - initial, rtol=1e-5, atol=1e-5)


def test_dpo_implicit_token_rewards():
  d = pair_inputs()
  out = losses.dpo_implicit_token_rewards(d["pi_w"], d["ref_w"], d["m_w"], beta=0.1)
  np.testing.assert_allclose(out, 0.1 * (d["pi_w"] - d["ref_w"]) * d["m_w"], rtol=1e-5, atol=1e-7)


# --- the composed objective --------------------------------------------------------------------------------------


def np_dpo_reg(d, beta, alpha, static=False):
  s = lambda x, m: np.sum(x * m, -1)
  z = beta * ((s(d["pi_w"], d["m_w"]) - s(d["ref_w"], d["m_w"])) - (s(d["pi_l"], d["m_l"]) - s(d["ref_l"], d["m_l"])))
  w = np.ones_like(z) if static else np_sigmoid(-z)
  reg = -beta * (s(d["r_w"] * d["pi_w"], d["m_w"]) + s(d["r_l"] * d["pi_l"], d["m_l"]))
  return np.mean(-np_log_sigmoid(z) + alpha * w * reg), w


def test_dpo_reg_objective_matches_numpy():
  d = pair_inputs()
  loss, metrics = objective(d, loss="dpo", regularizer="treg", beta=0.1, alpha=0.25)
  expected, w = np_dpo_reg(d, 0.1, 0.25)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["weight/mean"], w.mean(), rtol=1e-5)


def test_static_weight_ablation_uses_unit_weight():
  d = pair_inputs()
  loss, metrics = objective(d, loss="dpo", regularizer="treg", beta=0.1, alpha=0.5, weighting="static")
  np.testing.assert_allclose(loss, np_dpo_reg(d, 0.1, 0.5, static=True)[0], rtol=1e-5)
  assert float(metrics["weight/mean"]) == 1.0


def test_simpo_reg_objective_matches_numpy():
  d = pair_inputs()
  beta, gamma, alpha = 2.5, 1.4, 0.1
  avg = lambda x, m: np.sum(x * m, -1) / m.sum(-1)
  z = beta * avg(d["pi_w"], d["m_w"]) - beta * avg(d["pi_l"], d["m_l"]) - gamma
  reg = -beta * (avg(d["r_w"] * d["pi_w"], d["m_w"]) + avg(d["r_l"] * d["pi_l"], d["m_l"]))
  expected = np.mean(-np_log_sigmoid(z) + alpha * np_sigmoid(-z) * reg)
  loss, _ = objective(d, loss="simpo", regularizer="treg", beta=beta, gamma=gamma, alpha=alpha)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_sft_ablation_adds_alpha_times_chosen_nll():
  d = pair_inputs()
  base, _ = objective(d, loss="dpo", beta=0.1)
  with_sft, _ = objective(d, loss="dpo", regularizer="sft", beta=0.1, alpha=0.3)
  np.testing.assert_allclose(with_sft - base, 0.3 * np.mean(-np.sum(d["pi_w"] * d["m_w"], -1)), rtol=1e-4)


def test_dpo_reg_with_zero_alpha_equals_dpo():
  d = pair_inputs()
  np.testing.assert_allclose(objective(d, loss="dpo", regularizer="treg", alpha=0.0)[0], objective(d, loss="dpo")[0],
                             rtol=1e-6)


def test_objective_tgdpo_with_zero_rewards_equals_dpo():
  d = pair_inputs()
  d["r_w"], d["r_l"] = np.zeros_like(d["r_w"]), np.zeros_like(d["r_l"])
  np.testing.assert_allclose(objective(d, loss="tgdpo")[0], objective(d, loss="dpo")[0], rtol=1e-5)


def test_treg_gradient_is_minus_alpha_w_beta_rhat_on_response_tokens():
  """The regulariser's gradient w.r.t. log π_t is −α·w·β·r̂_t/B: w is a constant (stop-gradient)."""
  d = pair_inputs()
  beta, alpha = 0.2, 0.25
  b = d["pi_w"].shape[0]
  opts = losses.ObjectiveOptions(loss="dpo", regularizer="treg", beta=beta, alpha=alpha)

  def reg(pi_w, pi_l):
    _, metrics = losses.preference_objective(pi_w, pi_l, d["m_w"], d["m_l"], options=opts,
                                             ref_chosen_logps=np.sum(d["ref_w"] * d["m_w"], -1),
                                             ref_rejected_logps=np.sum(d["ref_l"] * d["m_l"], -1),
                                             chosen_token_rewards=d["r_w"], rejected_token_rewards=d["r_l"])
    return metrics["loss/regularizer"] * b / b  # mean over batch already applied

  g_w, g_l = jax.grad(reg, (0, 1))(jnp.asarray(d["pi_w"]), jnp.asarray(d["pi_l"]))
  _, w = np_dpo_reg(d, beta, alpha)
  np.testing.assert_allclose(g_w, -alpha * w[:, None] * beta * d["r_w"] * d["m_w"] / b, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(g_l, -alpha * w[:, None] * beta * d["r_l"] * d["m_l"] / b, rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(g_w)[~d["m_w"]] == 0) and np.all(np.asarray(g_l)[~d["m_l"]] == 0)


@pytest.mark.parametrize("options", [
    dict(loss="dpo", regularizer="treg"),
    dict(loss="simpo", regularizer="treg"),
    dict(loss="tgdpo"),
    dict(loss="tisdpo"),
    dict(loss="confpo", beta=2.0, gamma=1.0),
])
def test_values_off_the_mask_change_nothing(options):
  d = pair_inputs()
  loss, metrics = objective(d, **options)
  noisy = dict(d)
  for key, mkey in (("pi_w", "m_w"), ("pi_l", "m_l"), ("ref_w", "m_w"), ("ref_l", "m_l"), ("r_w", "m_w"),
                    ("r_l", "m_l")):
    noisy[key] = np.where(d[mkey], d[key], RNG.normal(size=d[key].shape) * 100).astype(np.float32)
  loss2, metrics2 = objective(noisy, **options)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  for k in metrics:
    np.testing.assert_allclose(metrics2[k], metrics[k], rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("options", [
    dict(loss="dpo", label_smoothing=0.1),
    dict(loss="ipo"),
    dict(loss="simpo", regularizer="treg", weighting="static"),
    dict(loss="dpo", regularizer="treg", weighting="static"),
    dict(loss="dpo", regularizer="sft"),
    dict(loss="tgdpo"),
    dict(loss="tisdpo"),
    dict(loss="confpo", beta=2.0, gamma=1.0),
])
def test_objective_gradient_matches_central_finite_differences(options):
  jax.config.update("jax_enable_x64", True)
  try:
    d = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in pair_inputs(b=3, t=5).items()}
    opts = losses.ObjectiveOptions(**options)

    def f(pi_w, pi_l):
      return losses.preference_objective(pi_w, pi_l, d["m_w"], d["m_l"], options=opts,
                                         ref_chosen_token_logps=d["ref_w"], ref_rejected_token_logps=d["ref_l"],
                                         chosen_token_rewards=d["r_w"], rejected_token_rewards=d["r_l"])[0]

    x_w, x_l = jnp.asarray(d["pi_w"]), jnp.asarray(d["pi_l"])
    g_w, g_l = jax.grad(f, (0, 1))(x_w, x_l)
    eps = 1e-6
    for which, g in ((0, g_w), (1, g_l)):
      fd = np.zeros(g.shape)
      for idx in np.ndindex(g.shape):
        e = np.zeros(g.shape)
        e[idx] = eps
        args_p = [x_w, x_l]
        args_m = [x_w, x_l]
        args_p[which] = args_p[which] + e
        args_m[which] = args_m[which] - e
        fd[idx] = (f(*args_p) - f(*args_m)) / (2 * eps)
      np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
  finally:
    jax.config.update("jax_enable_x64", False)


def test_objective_is_jittable_and_vmappable():
  d = pair_inputs()
  opts = losses.ObjectiveOptions(loss="dpo", regularizer="treg")
  f = lambda pw, pl: losses.preference_objective(pw, pl, d["m_w"], d["m_l"], options=opts,
                                                 ref_chosen_token_logps=d["ref_w"], ref_rejected_token_logps=d["ref_l"],
                                                 chosen_token_rewards=d["r_w"], rejected_token_rewards=d["r_l"])[0]
  eager = f(d["pi_w"], d["pi_l"])
  np.testing.assert_allclose(jax.jit(f)(d["pi_w"], d["pi_l"]), eager, rtol=1e-6)
  stacked = jax.vmap(f)(np.stack([d["pi_w"], d["pi_w"]]), np.stack([d["pi_l"], d["pi_l"]]))
  np.testing.assert_allclose(stacked, [eager, eager], rtol=1e-6)


def test_metrics_follow_trl_definitions():
  d = pair_inputs()
  _, metrics = objective(d, loss="dpo", beta=0.1)
  s = lambda x, m: np.sum(x * m, -1)
  cr = 0.1 * (s(d["pi_w"], d["m_w"]) - s(d["ref_w"], d["m_w"]))
  rr = 0.1 * (s(d["pi_l"], d["m_l"]) - s(d["ref_l"], d["m_l"]))
  np.testing.assert_allclose(metrics["rewards/chosen"], cr.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/margin"], (cr - rr).mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["rewards/accuracy"], (cr > rr).mean())
  np.testing.assert_allclose(metrics["logps/chosen"], s(d["pi_w"], d["m_w"]).mean(), rtol=1e-5)


def np_log_mean_prob(logps, mask):
  return np.array([np.log(np.mean(np.exp(logps[i][mask[i]].astype(np.float64)))) for i in range(len(logps))])


def test_confidence_token_rewards_match_numpy_centred_at_the_mean_probability():
  d = pair_inputs()
  threshold = np_log_mean_prob(d["ref_w"], d["m_w"])
  expected = np.where(d["m_w"], np_sigmoid(d["ref_w"] - threshold[:, None]) - 0.5, 0.0)
  out = losses.confidence_token_rewards(d["ref_w"], d["m_w"])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  # Hand-made: probabilities 0.5, 0.25, 0.25 -> mean 1/3; the first token is above it, the others below.
  r = np.asarray(losses.confidence_token_rewards(np.log([[0.5, 0.25, 0.25, 1.0]]), np.array([[1, 1, 1, 0]], bool)))
  np.testing.assert_allclose(r[0, :3], [np_sigmoid(np.log(1.5)) - 0.5] + [np_sigmoid(np.log(0.75)) - 0.5] * 2,
                             rtol=1e-5)
  assert r[0, 3] == 0.0
  assert np.all(np.isfinite(losses.confidence_token_rewards(np.zeros((2, 3)), np.zeros((2, 3), bool))))


def np_tis_weights(r, mask, chosen, mu=1.0, lower=-0.5, upper=1.5):
  out = np.zeros(r.shape)
  for i in range(len(r)):
    p = r[i][mask[i]].astype(np.float64) + 0.5
    delta = np.clip(np.log(p / (1 - p)), lower, upper)
    w = np.exp((mu if chosen else -mu) * delta)
    out[i][mask[i]] = w / w.mean()
  return out


def test_tisdpo_weights_invert_the_contrastive_reward_and_average_one():
  d = pair_inputs()
  for chosen, r, m in ((True, d["r_w"], d["m_w"]), (False, d["r_l"], d["m_l"])):
    w = np.asarray(losses.tisdpo_token_weights(r, m, chosen=chosen))
    np.testing.assert_allclose(w, np_tis_weights(r, m, chosen), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.sum(-1) / m.sum(-1), 1.0, rtol=1e-5)
  # δ = 1 exactly: r̂ = σ(1) − 0.5; a saturated r̂ = +0.5 clamps to U rather than overflowing.
  better, worse = np.log(np.array([[0.6, 0.3, 0.2]])), np.log(np.array([[0.6 / np.e, 0.3, 0.2]]))
  r = np.asarray(losses.contrastive_token_rewards(better, worse, np.ones((1, 3), bool)))
  w = np.asarray(losses.tisdpo_token_weights(np.concatenate([r, [[0.5, 0.0, 0.0]]]), np.ones((2, 3), bool),
                                             chosen=True))
  np.testing.assert_allclose(w[0], np.array([np.e, 1, 1]) / ((np.e + 2) / 3), rtol=1e-5)
  np.testing.assert_allclose(w[1], np.array([np.exp(1.5), 1, 1]) / ((np.exp(1.5) + 2) / 3), rtol=1e-5)


def test_tisdpo_loss_matches_numpy_and_flat_weights_give_dpo():
  d = pair_inputs()
  beta = 0.1
  ww, wl = np_tis_weights(d["r_w"], d["m_w"], True), np_tis_weights(d["r_l"], d["m_l"], False)
  zw = beta * np.sum(ww * (d["pi_w"] - d["ref_w"]) * d["m_w"], -1)
  zl = beta * np.sum(wl * (d["pi_l"] - d["ref_l"]) * d["m_l"], -1)
  loss, _ = objective(d, loss="tisdpo", beta=beta)
  np.testing.assert_allclose(loss, np.mean(-np_log_sigmoid(zw - zl)), rtol=1e-5)
  flat = dict(d, r_w=np.zeros_like(d["r_w"]), r_l=np.zeros_like(d["r_l"]))
  np.testing.assert_allclose(objective(flat, loss="tisdpo")[0], objective(flat, loss="dpo")[0], rtol=1e-5)


def np_confpo(d, beta, gamma):
  losses_out = []
  for i in range(len(d["pi_w"])):
    avgs = []
    for pi, m in ((d["pi_w"][i], d["m_w"][i]), (d["pi_l"][i], d["m_l"][i])):
      x = pi[m].astype(np.float64)
      sel = x[x < np.log(np.mean(np.exp(x)))]
      avgs.append(sel.mean() if len(sel) else None)
    if avgs[0] is None or avgs[1] is None:
      losses_out.append(0.0)
    else:
      losses_out.append(-np_log_sigmoid(beta * (avgs[0] - avgs[1]) - gamma))
  return np.mean(losses_out)


def test_confpo_matches_numpy_selecting_below_mean_probability_tokens():
  d = pair_inputs(b=6, t=11, seed=3)
  loss, metrics = objective(d, loss="confpo", beta=2.0, gamma=1.0)
  np.testing.assert_allclose(loss, np_confpo(d, 2.0, 1.0), rtol=1e-5)
  assert 0.0 < float(metrics["confpo/selected_fraction"]) < 1.0
  # A response of equal token probabilities selects nothing: that pair's loss is 0 (the release's rule).
  flat = dict(d, pi_w=np.full_like(d["pi_w"], -1.0))
  np.testing.assert_allclose(objective(flat, loss="confpo", beta=2.0, gamma=1.0)[0], 0.0)


def test_confpo_gradient_flows_only_through_selected_tokens():
  d = pair_inputs()
  opts = losses.ObjectiveOptions(loss="confpo", beta=2.0, gamma=1.0)
  g = jax.grad(lambda pw: losses.preference_objective(pw, d["pi_l"], d["m_w"], d["m_l"], options=opts)[0])(
      jnp.asarray(d["pi_w"]))
  def selected(x, m):
    x = x.astype(np.float64)
    return m & (x < np.log(np.mean(np.exp(x[m]))))

  live = 0
  for i in range(len(d["pi_w"])):
    sel_w, sel_l = selected(d["pi_w"][i], d["m_w"][i]), selected(d["pi_l"][i], d["m_l"][i])
    assert np.all(np.asarray(g[i])[~sel_w] == 0)
    if sel_w.any() and sel_l.any():  # else the pair's loss is 0
      assert np.all(np.asarray(g[i])[sel_w] != 0)
      live += 1
  assert live > 0


# --- bad input ---------------------------------------------------------------------------------------------------


def test_bad_inputs_are_rejected_with_named_arguments():
  d = pair_inputs()
  with pytest.raises(ValueError, match="chosen_mask"):
    losses.preference_objective(d["pi_w"], d["pi_l"], d["m_w"][:, :3], d["m_l"], options=losses.ObjectiveOptions(),
                                ref_chosen_logps=np.zeros(4), ref_rejected_logps=np.zeros(4))
  with pytest.raises(ValueError, match="labels must be an integer"):
    losses.token_logps(np.zeros((1, 2, 3)), np.zeros((1, 2), np.float32))
  with pytest.raises(ValueError, match="ref_chosen_logps"):
    losses.preference_objective(d["pi_w"], d["pi_l"], d["m_w"], d["m_l"], options=losses.ObjectiveOptions())
  with pytest.raises(ValueError, match="chosen_token_rewards"):
    losses.preference_objective(d["pi_w"], d["pi_l"], d["m_w"], d["m_l"],
                                options=losses.ObjectiveOptions(regularizer="treg"), ref_chosen_logps=np.zeros(4),
                                ref_rejected_logps=np.zeros(4))
  with pytest.raises(ValueError, match="shape mismatch"):
    losses.dpo_loss(np.zeros(3), np.zeros(4), np.zeros(3), np.zeros(3), beta=0.1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss="kto"), "valid choices: dpo, ipo, simpo, tgdpo, tisdpo, confpo"),
    (dict(loss="tisdpo", regularizer="treg"), "tisdpo already uses the token rewards"),
    (dict(tis_lower=1.0, tis_upper=0.5), "tis_lower must be < tis_upper"),
    (dict(regularizer="l2"), "valid choices: none, treg, sft"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(weighting="adaptive"), "dynamic, static"),
])
def test_bad_options_are_errors_listing_valid_choices(kwargs, message):
  with pytest.raises(ValueError, match=message):
    losses.ObjectiveOptions(**kwargs)


# --- a foreign codebase ------------------------------------------------------------------------------------------


def test_foreign_jax_model_learns_preferences_with_preference_objective():
  """A hand-written bigram LM (no tregjax model code) trained with DPO-REG ranks held-out pairs correctly."""
  vocab, length, n = 16, 8, 64
  rng = np.random.default_rng(3)

  def make_pairs(count):
    # Chosen responses count up by one (mod vocab); rejected ones count up by three. Prompt: first token only.
    start = rng.integers(0, vocab, count)
    steps = np.arange(length)
    chosen = (start[:, None] + steps[None, :]) % vocab
    rejected = (start[:, None] + 3 * steps[None, :]) % vocab
    return chosen.astype(np.int32), rejected.astype(np.int32)

  def logps(params, tokens):
    logits = params["emb"][tokens[:, :-1]] @ params["out"]
    return losses.token_logps(logits, tokens[:, 1:])

  key = jax.random.PRNGKey(0)
  params = {"emb": 0.1 * jax.random.normal(key, (vocab, 16)), "out": 0.1 * jax.random.normal(key, (16, vocab))}
  ref = jax.tree.map(jnp.copy, params)
  mask = np.ones((n, length - 1), bool)
  train_w, train_l = make_pairs(n)
  test_w, test_l = make_pairs(n)
  opts = losses.ObjectiveOptions(loss="dpo", regularizer="treg", beta=0.5, alpha=0.25)

  def loss_fn(params, w, l):
    ref_w, ref_l = logps(ref, w), logps(ref, l)
    return losses.preference_objective(logps(params, w), logps(params, l), mask, mask, options=opts,
                                       ref_chosen_token_logps=ref_w, ref_rejected_token_logps=ref_l,
                                       chosen_token_rewards=np.full(mask.shape, 0.25, np.float32),
                                       rejected_token_rewards=np.full(mask.shape, -0.25, np.float32))

  tx = optax.adam(0.05)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: loss_fn(p, train_w, train_l)[0])(params)
    updates, state = tx.update(grads, state)
    return optax.apply_updates(params, updates), state

  before = float(loss_fn(params, test_w, test_l)[1]["rewards/margin"])
  for _ in range(40):
    params, state = step(params, state)
  _, metrics = loss_fn(params, test_w, test_l)
  assert before == 0.0
  assert float(metrics["rewards/accuracy"]) > 0.95
  assert float(metrics["rewards/margin"]) > 1.0


def test_sharded_batch_on_four_devices_equals_single_device(devices_runner):
  out = devices_runner(
      """
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from tregjax import losses
      rng = np.random.default_rng(0)
      b, t = 8, 6
      arrs = [rng.normal(-2, 1, (b, t)).astype(np.float32) for _ in range(4)]
      rw = rng.uniform(-.5, .5, (b, t)).astype(np.float32); rl = rng.uniform(-.5, .5, (b, t)).astype(np.float32)
      m = np.ones((b, t), bool); m[:, :2] = False
      opts = losses.ObjectiveOptions(loss="dpo", regularizer="treg")
      def f(pw, pl, rfw, rfl, rw, rl, m):
        return losses.preference_objective(pw, pl, m, m, options=opts, ref_chosen_token_logps=rfw,
                                           ref_rejected_token_logps=rfl, chosen_token_rewards=rw,
                                           rejected_token_rewards=rl)[0]
      single = jax.jit(f)(*arrs, rw, rl, m)
      mesh = jax.make_mesh((4,), ("data",))
      sh = NamedSharding(mesh, P("data"))
      args = [jax.device_put(x, sh) for x in (*arrs, rw, rl, m)]
      sharded = jax.jit(f)(*args)
      assert len(jax.devices()) == 4 and len(args[0].sharding.device_set) == 4
      print(repr(float(single)), repr(float(sharded)))
      """, 4)
  single, sharded = map(float, out.split())
  np.testing.assert_allclose(sharded, single, rtol=1e-6)
