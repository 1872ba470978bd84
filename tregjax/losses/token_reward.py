"""Token-level rewards and the losses that use them: T-REG's regulariser and sequence weight, TGDPO, R3HF.

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

  def guided(pi, ref, r, mask, sign):
    scale = beta * (1.0 + sign * alpha * jax.lax.stop_gradient(f(r)))
    return jnp.sum(jnp.where(jnp.asarray(mask).astype(bool), scale * (f(pi) - f(ref)), 0.0), axis=-1)

  chosen_rewards = guided(pi_w_tok, ref_w_tok, r_w_tok, mask_w, +1.0)
  rejected_rewards = guided(pi_l_tok, ref_l_tok, r_l_tok, mask_l, -1.0)
  z = chosen_rewards - rejected_rewards
  return PreferenceOutput(-jax.nn.log_sigmoid(z), z, chosen_rewards, rejected_rewards)


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
