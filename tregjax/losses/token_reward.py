"""Token-level rewards and the losses that use them: T-REG's regulariser and sequence weight, TGDPO, TIS-DPO, ConfPO,
R3HF, and the reference-confidence rewards.

Every [B, T] array here is aligned with the labels (position t scores token labels[t]) and `mask` marks the response
tokens that count; values off the mask never influence a result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tregjax.losses import _checks
from tregjax.losses.preference import PreferenceOutput


def _bt(name: str, x: jax.Array) -> None:
  _checks.check_rank(name, x, 2, "[B, T]")


def contrastive_token_rewards(logp_better: jax.Array, logp_worse: jax.Array, mask: jax.Array) -> jax.Array:
  """T-REG's self-generated reward r̂_t = σ(log π(y_t|x_better, y<t) − log π(y_t|x_worse, y<t)) − 0.5 ∈ [−0.5, 0.5].

  Both inputs are the reference model's per-token log-probs of the same response under the two contrastive prompts.
  Zero off the mask; float32 [B, T].
  """
  _bt("logp_better", logp_better)
  _checks.check_same_shape(logp_better=logp_better, logp_worse=logp_worse, mask=mask)
  diff = _checks.as_float(logp_better) - _checks.as_float(logp_worse)
  return jnp.where(jnp.asarray(mask).astype(bool), jax.nn.sigmoid(diff) - 0.5, 0.0)


def confidence_token_rewards(ref_token_logps: jax.Array, mask: jax.Array) -> jax.Array:
  """Token rewards from the reference's own confidence (ConfPO-style; no prompt, no extra model):

  r̂_t = σ(log π_ref(y_t|x, y<t) − log p̄) − 0.5 ∈ [−0.5, 0.5),  p̄ = mean_s π_ref(y_s|x, y<s) over the response,
  i.e. centred at ConfPO's threshold (a token is "low-confidence" when its probability is below the response's mean
  probability) and squashed like T-REG's contrastive rewards. Zero off the mask; float32 [B, T].
  """
  _bt("ref_token_logps", ref_token_logps)
  _checks.check_same_shape(ref_token_logps=ref_token_logps, mask=mask)
  mask = jnp.asarray(mask).astype(bool)
  logps = _checks.as_float(ref_token_logps)
  threshold = _log_mean_prob(logps, mask)
  return jnp.where(mask, jax.nn.sigmoid(logps - threshold[:, None]) - 0.5, 0.0)


def _log_mean_prob(logps: jax.Array, mask: jax.Array) -> jax.Array:
  """log(mean over masked t of exp(logps_t)) per row [B] (0 for an empty row), stably."""
  count = jnp.sum(mask, axis=-1)
  lse = jax.nn.logsumexp(jnp.where(mask, logps, -jnp.inf), axis=-1)
  return jnp.where(count > 0, lse - jnp.log(jnp.maximum(count, 1).astype(logps.dtype)), 0.0)


def dpo_implicit_token_rewards(logp_policy: jax.Array, logp_ref: jax.Array, mask: jax.Array, *,
                               beta: float) -> jax.Array:
  """DPO's implicit per-token reward β·(log π_dpo(y_t) − log π_ref(y_t)) (the T-REG ablation and TGDPO's guidance)."""
  _bt("logp_policy", logp_policy)
  _checks.check_positive("beta", beta)
  _checks.check_same_shape(logp_policy=logp_policy, logp_ref=logp_ref, mask=mask)
  diff = _checks.as_float(logp_policy) - _checks.as_float(logp_ref)
  return jnp.where(jnp.asarray(mask).astype(bool), beta * diff, 0.0)


def token_regularizer(token_logps: jax.Array,
                      token_rewards: jax.Array,
                      mask: jax.Array,
                      *,
                      beta: float,
                      normalize: bool = False) -> jax.Array:
  """T-REG's L_REG(y) = −β Σ_t r̂_t log π(y_t | x, y<t) over masked tokens; float32 [B].

  A reward-weighted language-modelling loss: it raises positive-reward tokens and lowers negative ones. The token
  rewards are data (stop-gradient). `normalize=True` divides by the response length (our SimPO-REG choice, matching
  SimPO's length-normalised implicit reward β/|y|·log π).
  """
  _bt("token_logps", token_logps)
  _checks.check_positive("beta", beta)
  _checks.check_same_shape(token_logps=token_logps, token_rewards=token_rewards, mask=mask)
  mask = jnp.asarray(mask).astype(bool)
  rewards = jax.lax.stop_gradient(_checks.as_float(token_rewards))
  per_token = jnp.where(mask, rewards * _checks.as_float(token_logps), 0.0)
  total = -beta * jnp.sum(per_token, axis=-1)
  if normalize:
    total = total / jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(total.dtype)
  return total


def sequence_weight(out: PreferenceOutput) -> jax.Array:
  """w = sg[σ(−z)]: the magnitude of the preference loss's own gradient per example (T-REG eq. for DPO: σ(r_l − r_w)).

  Large while the pair is still mis-ranked, small once it is learnt, so the regulariser fades where DPO is done.
  """
  return jax.lax.stop_gradient(jax.nn.sigmoid(-out.logits))


def tgdpo_loss(pi_w_tok: jax.Array,
               pi_l_tok: jax.Array,
               ref_w_tok: jax.Array,
               ref_l_tok: jax.Array,
               r_w_tok: jax.Array,
               r_l_tok: jax.Array,
               mask_w: jax.Array,
               mask_l: jax.Array,
               *,
               beta: float,
               alpha: float) -> PreferenceOutput:
  """TGDPO (Zhu et al. 2025; as in the release's tgdpo trainer): −logσ(z) with

  z = Σ_t β(1 + α·r^w_t)(π^w_t − ref^w_t) − Σ_t β(1 − α·r^l_t)(π^l_t − ref^l_t) over masked tokens.
  The token rewards scale how far each token may move from the reference; with r ≡ 0 this is DPO. The reported
  rewards are the two guided sums, so their difference is z.
  """
  _checks.check_positive("beta", beta)
  for name, x in (("pi_w_tok", pi_w_tok), ("pi_l_tok", pi_l_tok)):
    _bt(name, x)
  _checks.check_same_shape(pi_w_tok=pi_w_tok, ref_w_tok=ref_w_tok, r_w_tok=r_w_tok, mask_w=mask_w)
  _checks.check_same_shape(pi_l_tok=pi_l_tok, ref_l_tok=ref_l_tok, r_l_tok=r_l_tok, mask_l=mask_l)
  f = _checks.as_float
  chosen_rewards = _weighted_log_ratio(pi_w_tok, ref_w_tok, beta * (1.0 + alpha * f(r_w_tok)), mask_w)
  rejected_rewards = _weighted_log_ratio(pi_l_tok, ref_l_tok, beta * (1.0 - alpha * f(r_l_tok)), mask_l)
  z = chosen_rewards - rejected_rewards
  return PreferenceOutput(-jax.nn.log_sigmoid(z), z, chosen_rewards, rejected_rewards)


def _weighted_log_ratio(pi: jax.Array, ref: jax.Array, weight: jax.Array, mask: jax.Array) -> jax.Array:
  """Σ_t sg[weight_t]·(log π(y_t) − log π_ref(y_t)) over masked tokens [B]: the token-weighted DPO reward that TGDPO
  and TIS-DPO share (weights are data, never differentiated)."""
  f = _checks.as_float
  per_token = jax.lax.stop_gradient(weight) * (f(pi) - f(ref))
  return jnp.sum(jnp.where(jnp.asarray(mask).astype(bool), per_token, 0.0), axis=-1)


def tisdpo_token_weights(token_rewards: jax.Array, mask: jax.Array, *, chosen: bool, mu: float = 1.0,
                         lower: float = -0.5, upper: float = 1.5) -> jax.Array:
  """TIS-DPO's importance weights (Liu et al. 2025, prompt-contrast variant) from T-REG's contrastive rewards:

  δ_t = log π_ref(y_t|x_better) − log π_ref(y_t|x_worse) = logit(r̂_t + 0.5) (r̂ = σ(δ) − 0.5, inverted exactly
  wherever |δ| is inside the clamp), w_t = k·exp(±μ·clamp(δ_t, L, U)) with + for the chosen response (its good tokens
  weigh more) and − for the rejected one (its bad tokens weigh more); k normalises the weights to mean 1 over the
  response's tokens, so flat rewards give DPO exactly (our reading of the paper's "k is a normalisation constant").
  Zero off the mask; float32 [B, T].
  """
  _bt("token_rewards", token_rewards)
  _checks.check_same_shape(token_rewards=token_rewards, mask=mask)
  if not lower < upper:
    raise ValueError(f"lower must be < upper, got lower={lower}, upper={upper}")
  mask = jnp.asarray(mask).astype(bool)
  p = jnp.where(mask, _checks.as_float(token_rewards) + 0.5, 0.5)
  delta = jnp.clip(jnp.log(p) - jnp.log1p(-p), lower, upper)  # ±inf at a saturated r̂ = ±0.5 clamps to U / L
  raw = jnp.where(mask, jnp.exp((mu if chosen else -mu) * delta), 0.0)
  mean = jnp.sum(raw, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1)
  return jnp.where(mask, raw / jnp.where(mean > 0, mean, 1.0), 0.0)


def tisdpo_loss(pi_w_tok: jax.Array,
                pi_l_tok: jax.Array,
                ref_w_tok: jax.Array,
                ref_l_tok: jax.Array,
                weights_w: jax.Array,
                weights_l: jax.Array,
                mask_w: jax.Array,
                mask_l: jax.Array,
                *,
                beta: float) -> PreferenceOutput:
  """TIS-DPO (Liu et al. 2025, the release's `tisdpo` loss without its token-level KL term): −logσ(z) with

  z = β·Σ_t w^w_t (π^w_t − ref^w_t) − β·Σ_t w^l_t (π^l_t − ref^l_t) over masked tokens, the per-token importance
  weights w (`tisdpo_token_weights`) being data. Unit weights give DPO. Rewards reported: the two weighted sums.
  """
  _checks.check_positive("beta", beta)
  for name, x in (("pi_w_tok", pi_w_tok), ("pi_l_tok", pi_l_tok)):
    _bt(name, x)
  _checks.check_same_shape(pi_w_tok=pi_w_tok, ref_w_tok=ref_w_tok, weights_w=weights_w, mask_w=mask_w)
  _checks.check_same_shape(pi_l_tok=pi_l_tok, ref_l_tok=ref_l_tok, weights_l=weights_l, mask_l=mask_l)
  f = _checks.as_float
  chosen_rewards = _weighted_log_ratio(pi_w_tok, ref_w_tok, beta * f(weights_w), mask_w)
  rejected_rewards = _weighted_log_ratio(pi_l_tok, ref_l_tok, beta * f(weights_l), mask_l)
  z = chosen_rewards - rejected_rewards
  return PreferenceOutput(-jax.nn.log_sigmoid(z), z, chosen_rewards, rejected_rewards)


def confpo_loss(pi_w_tok: jax.Array,
                pi_l_tok: jax.Array,
                mask_w: jax.Array,
                mask_l: jax.Array,
                *,
                beta: float,
                gamma: float) -> tuple[PreferenceOutput, jax.Array, jax.Array]:
  """ConfPO (Yoon et al. 2025, as in the release's `cpo_loss_confpo`): SimPO on the policy's low-confidence tokens.

  S(y) = {t in mask : log π(y_t) < log mean_s π(y_s)} (the policy's own probabilities, not differentiated), ā(y) =
  mean over S(y) of log π(y_t), z = β·(ā(y_w) − ā(y_l)) − γ, loss −logσ(z); a pair where either S is empty has loss
  0 (the release's rule). Returns (output, |S(y_w)|, |S(y_l)|) [B] for the metrics.
  """
  _checks.check_positive("beta", beta)
  for name, x in (("pi_w_tok", pi_w_tok), ("pi_l_tok", pi_l_tok)):
    _bt(name, x)
  _checks.check_same_shape(pi_w_tok=pi_w_tok, mask_w=mask_w)
  _checks.check_same_shape(pi_l_tok=pi_l_tok, mask_l=mask_l)

  def selected_mean(pi, mask):
    pi, mask = _checks.as_float(pi), jnp.asarray(mask).astype(bool)
    frozen = jax.lax.stop_gradient(pi)
    selected = mask & (frozen < _log_mean_prob(frozen, mask)[:, None])
    count = jnp.sum(selected, axis=-1)
    total = jnp.sum(jnp.where(selected, pi, 0.0), axis=-1)
    return total / jnp.maximum(count, 1).astype(total.dtype), count

  avg_w, n_w = selected_mean(pi_w_tok, mask_w)
  avg_l, n_l = selected_mean(pi_l_tok, mask_l)
  chosen_rewards, rejected_rewards = beta * avg_w, beta * avg_l
  z = chosen_rewards - rejected_rewards - gamma
  loss = jnp.where((n_w > 0) & (n_l > 0), -jax.nn.log_sigmoid(z), 0.0)
  return PreferenceOutput(loss, z, chosen_rewards, rejected_rewards), n_w, n_l


def r3hf_token_rewards(prefix_scores: jax.Array, mask: jax.Array, initial_score: jax.Array) -> jax.Array:
  """R3HF reward redistribution (Li et al. 2024): r_t = R(x, y≤t) − R(x, y<t).

  `prefix_scores[b, t]` is the sequence reward model's score after reading response token t (read at every position
  of one forward pass); the predecessor of the first response token is `initial_score[b]` (the prompt-only score).
  The rewards telescope: Σ_t r_t = R(x, y) − R(x). Zero off the mask; float32 [B, T].
  """
  _bt("prefix_scores", prefix_scores)
  _checks.check_same_shape(prefix_scores=prefix_scores, mask=mask)
  _checks.check_rank("initial_score", initial_score, 1, "[B]")
  if jnp.shape(initial_score)[0] != jnp.shape(prefix_scores)[0]:
    raise ValueError(f"initial_score{list(jnp.shape(initial_score))} must have one entry per row of "
                     f"prefix_scores{list(jnp.shape(prefix_scores))}")
  scores = _checks.as_float(prefix_scores)
  mask = jnp.asarray(mask).astype(bool)
  length = scores.shape[1]
  # Index of the latest masked position strictly before t (−1 if none): its score is R(x, y<t).
  positions = jnp.where(mask, jnp.arange(length)[None, :], -1)
  latest = jax.lax.cummax(positions, axis=1)
  previous_index = jnp.concatenate([jnp.full_like(latest[:, :1], -1), latest[:, :-1]], axis=1)
  previous = jnp.take_along_axis(scores, jnp.maximum(previous_index, 0), axis=1)
  previous = jnp.where(previous_index >= 0, previous, _checks.as_float(initial_score)[:, None])
  return jnp.where(mask, scores - previous, 0.0)
