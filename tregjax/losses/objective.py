"""`preference_objective`: one call that composes a preference loss with T-REG (or an ablation) and reduces the batch."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tregjax.losses import _checks
from tregjax.losses.logprobs import sequence_logps
from tregjax.losses.preference import PREFERENCE_LOSSES, PreferenceOutput
from tregjax.losses.token_reward import (confpo_loss, sequence_weight, tgdpo_loss, tisdpo_loss, tisdpo_token_weights,
                                         token_regularizer)

LOSSES = ("dpo", "ipo", "simpo", "tgdpo", "tisdpo", "confpo")
TOKEN_REWARD_LOSSES = ("tgdpo", "tisdpo")  # losses that consume the token rewards themselves
REGULARIZERS = ("none", "treg", "sft")
WEIGHTINGS = ("dynamic", "static")
REG_NORMALIZATIONS = ("auto", "sum", "mean")


@dataclasses.dataclass(frozen=True)
class ObjectiveOptions:
  """What `preference_objective` computes. Validated on construction.

  loss: dpo | ipo | simpo | tgdpo | tisdpo (token-importance-weighted DPO, weights from the contrastive rewards) |
    confpo (SimPO on the policy's below-mean-probability tokens; β and γ as SimPO's).
  regularizer: none | treg (α·w·(L_REG(y_w) + L_REG(y_l))) | sft (ablation: α·(−Σ log π(y_w)), unweighted).
  weighting: dynamic (w = sg[σ(−z)], T-REG) | static (ablation: w ≡ 1).
  reg_normalization: auto (mean over response tokens for SimPO, sum otherwise: our reading of SimPO-REG, since the
    T-REG code was never released) | sum | mean.
  beta: β of the preference loss, also the β of L_REG. gamma: SimPO's absolute margin γ.
  alpha: T-REG's α (the paper searched 0.1 / 0.25 / 0.5). tgdpo_alpha: TGDPO's α (release default 0.5).
  tis_mu, tis_lower, tis_upper: TIS-DPO's μ and clamp [L, U] of the weights exp(±μ·clamp(δ, L, U)) (the paper's
    prompt-based setting as we read it: μ = 1, L = −0.5, U = 1.5).
  The DPO-implicit-reward ablation is not an option: pass β·(log π_dpo − log π_ref) as the token rewards.
  """
  loss: str = "dpo"
  regularizer: str = "none"
  beta: float = 0.1
  gamma: float = 0.5
  label_smoothing: float = 0.0
  alpha: float = 0.25
  weighting: str = "dynamic"
  reg_normalization: str = "auto"
  tgdpo_alpha: float = 0.5
  tis_mu: float = 1.0
  tis_lower: float = -0.5
  tis_upper: float = 1.5

  def __post_init__(self):
    for field, choices in (("loss", LOSSES), ("regularizer", REGULARIZERS), ("weighting", WEIGHTINGS),
                           ("reg_normalization", REG_NORMALIZATIONS)):
      if getattr(self, field) not in choices:
        raise ValueError(f"unknown {field} {getattr(self, field)!r}; valid choices: {', '.join(choices)}")
    if not self.beta > 0:
      raise ValueError(f"beta must be > 0, got {self.beta}")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
    if self.alpha < 0:
      raise ValueError(f"alpha must be >= 0, got {self.alpha}")
    if self.loss in TOKEN_REWARD_LOSSES and self.regularizer != "none":
      raise ValueError(f"{self.loss} already uses the token rewards; combine it with regularizer='none'")
    if not self.tis_lower < self.tis_upper:
      raise ValueError(f"tis_lower must be < tis_upper, got {self.tis_lower} and {self.tis_upper}")

  @property
  def normalize_regularizer(self) -> bool:
    if self.reg_normalization == "auto":
      return self.loss in ("simpo", "confpo")
    return self.reg_normalization == "mean"


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(bool)
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _require(name: str, value, why: str):
  if value is None:
    raise ValueError(f"{name} is required {why}")
  return value


def preference_objective(policy_chosen_logps: jax.Array,
                         policy_rejected_logps: jax.Array,
                         chosen_mask: jax.Array,
                         rejected_mask: jax.Array,
                         *,
                         options: ObjectiveOptions,
                         ref_chosen_logps: jax.Array | None = None,
                         ref_rejected_logps: jax.Array | None = None,
                         ref_chosen_token_logps: jax.Array | None = None,
                         ref_rejected_token_logps: jax.Array | None = None,
                         chosen_token_rewards: jax.Array | None = None,
                         rejected_token_rewards: jax.Array | None = None,
                         pair_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over the batch of [L_pref + regulariser]; returns (scalar loss, metrics).

  Inputs: the policy's per-token log-probs [B, T] of chosen and rejected responses with their masks [B, T]
  (T may differ between the two sides); the reference's summed log-probs [B] (or its per-token ones, summed here);
  per-token rewards [B, T] for T-REG / TGDPO. Each example weighs the same, so averaging equal-sized micro-batches
  (gradient accumulation) gives the full-batch value.
  `pair_mask` [B] (bool/0-1) marks the rows that are real pairs: the loss and metrics are means over those only
  (empty slots of packed rows expanded per segment, all-padding rows of a short final batch). None = every row.
  """
  pi_w_tok = _checks.as_float(policy_chosen_logps)
  pi_l_tok = _checks.as_float(policy_rejected_logps)
  _checks.check_rank("policy_chosen_logps", pi_w_tok, 2, "[B, T]")
  _checks.check_rank("policy_rejected_logps", pi_l_tok, 2, "[B, T]")
  _checks.check_same_shape(policy_chosen_logps=pi_w_tok, chosen_mask=chosen_mask,
                           ref_chosen_token_logps=ref_chosen_token_logps, chosen_token_rewards=chosen_token_rewards)
  _checks.check_same_shape(policy_rejected_logps=pi_l_tok, rejected_mask=rejected_mask,
                           ref_rejected_token_logps=ref_rejected_token_logps,
                           rejected_token_rewards=rejected_token_rewards)
  if pi_w_tok.shape[0] != pi_l_tok.shape[0]:
    raise ValueError(f"chosen and rejected batch sizes differ: {pi_w_tok.shape[0]} vs {pi_l_tok.shape[0]}")
  for name, x in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
    if x is not None and jnp.shape(x) != pi_w_tok.shape[:1]:
      raise ValueError(f"{name} must have shape [B] = {list(pi_w_tok.shape[:1])}, got {list(jnp.shape(x))}")
  if pair_mask is not None and jnp.shape(pair_mask) != pi_w_tok.shape[:1]:
    raise ValueError(f"pair_mask must have shape [B] = {list(pi_w_tok.shape[:1])}, got {list(jnp.shape(pair_mask))}")
  chosen_mask = jnp.asarray(chosen_mask).astype(bool)
  rejected_mask = jnp.asarray(rejected_mask).astype(bool)
  o = options
  if pair_mask is None:
    mean = jnp.mean
  else:
    pairs = jnp.asarray(pair_mask).astype(bool)
    mean = lambda x: jnp.sum(jnp.where(pairs, x, 0.0)) / jnp.maximum(jnp.sum(pairs), 1)  # noqa: E731

  def ref_sum(summed, per_token, mask, name):
    if summed is not None:
      return _checks.as_float(summed)
    per_token = _require(name, per_token, f"(or its per-token form) for loss={o.loss!r}")
    return sequence_logps(per_token, mask)

  pi_w = sequence_logps(pi_w_tok, chosen_mask)
  pi_l = sequence_logps(pi_l_tok, rejected_mask)
  if o.loss in ("dpo", "ipo"):
    ref_w = ref_sum(ref_chosen_logps, ref_chosen_token_logps, chosen_mask, "ref_chosen_logps")
    ref_l = ref_sum(ref_rejected_logps, ref_rejected_token_logps, rejected_mask, "ref_rejected_logps")
    kwargs = {"label_smoothing": o.label_smoothing} if o.loss == "dpo" else {}
    out: PreferenceOutput = PREFERENCE_LOSSES[o.loss](pi_w, pi_l, ref_w, ref_l, beta=o.beta, **kwargs)
  elif o.loss == "simpo":
    out = PREFERENCE_LOSSES["simpo"](sequence_logps(pi_w_tok, chosen_mask, average=True),
                                     sequence_logps(pi_l_tok, rejected_mask, average=True),
                                     beta=o.beta, gamma=o.gamma, label_smoothing=o.label_smoothing)
  elif o.loss == "confpo":
    out, selected_w, selected_l = confpo_loss(pi_w_tok, pi_l_tok, chosen_mask, rejected_mask, beta=o.beta,
                                              gamma=o.gamma)
  elif o.loss == "tisdpo":
    why = "for loss='tisdpo'"
    weights_w = tisdpo_token_weights(_require("chosen_token_rewards", chosen_token_rewards, why), chosen_mask,
                                     chosen=True, mu=o.tis_mu, lower=o.tis_lower, upper=o.tis_upper)
    weights_l = tisdpo_token_weights(_require("rejected_token_rewards", rejected_token_rewards, why), rejected_mask,
                                     chosen=False, mu=o.tis_mu, lower=o.tis_lower, upper=o.tis_upper)
    out = tisdpo_loss(pi_w_tok, pi_l_tok,
                      _require("ref_chosen_token_logps", ref_chosen_token_logps, why),
                      _require("ref_rejected_token_logps", ref_rejected_token_logps, why),
                      weights_w, weights_l, chosen_mask, rejected_mask, beta=o.beta)
  else:  # tgdpo
    why = "for loss='tgdpo'"
    out = tgdpo_loss(pi_w_tok, pi_l_tok,
                     _require("ref_chosen_token_logps", ref_chosen_token_logps, why),
                     _require("ref_rejected_token_logps", ref_rejected_token_logps, why),
                     _require("chosen_token_rewards", chosen_token_rewards, why),
                     _require("rejected_token_rewards", rejected_token_rewards, why),
                     chosen_mask, rejected_mask, beta=o.beta, alpha=o.tgdpo_alpha)

  weight = sequence_weight(out) if o.weighting == "dynamic" else jnp.ones_like(out.loss)
  if o.regularizer == "treg":
    why = "for regularizer='treg'"
    reg_w = token_regularizer(pi_w_tok, _require("chosen_token_rewards", chosen_token_rewards, why), chosen_mask,
                              beta=o.beta, normalize=o.normalize_regularizer)
    reg_l = token_regularizer(pi_l_tok, _require("rejected_token_rewards", rejected_token_rewards, why),
                              rejected_mask, beta=o.beta, normalize=o.normalize_regularizer)
    regularizer = o.alpha * weight * (reg_w + reg_l)
  elif o.regularizer == "sft":
    nll = -sequence_logps(pi_w_tok, chosen_mask, average=o.normalize_regularizer)
    regularizer = o.alpha * nll
  else:
    regularizer = jnp.zeros_like(out.loss)

  per_example = out.loss + regularizer
  loss = mean(per_example)
  metrics = {
      "loss/total": loss,
      "loss/preference": mean(out.loss),
      "loss/regularizer": mean(regularizer),
      "weight/mean": mean(weight),
      "rewards/chosen": mean(out.chosen_rewards),
      "rewards/rejected": mean(out.rejected_rewards),
      "rewards/margin": mean(out.chosen_rewards - out.rejected_rewards),
      "rewards/accuracy": mean((out.chosen_rewards > out.rejected_rewards).astype(jnp.float32)),
      "logps/chosen": mean(pi_w),
      "logps/rejected": mean(pi_l),
  }
  if o.loss == "confpo":  # fraction of response tokens ConfPO trains on
    metrics["confpo/selected_fraction"] = ((jnp.sum(selected_w) + jnp.sum(selected_l)) /
                                           jnp.maximum(jnp.sum(chosen_mask) + jnp.sum(rejected_mask), 1))
  if chosen_token_rewards is not None and rejected_token_rewards is not None:
    r_w = _checks.as_float(chosen_token_rewards)
    r_l = _checks.as_float(rejected_token_rewards)
    metrics["token_rewards/chosen_mean"] = _masked_mean(r_w, chosen_mask)
    metrics["token_rewards/rejected_mean"] = _masked_mean(r_l, rejected_mask)
    metrics["token_rewards/positive_fraction"] = (
        (jnp.sum(jnp.where(chosen_mask, r_w > 0, False)) + jnp.sum(jnp.where(rejected_mask, r_l > 0, False))) /
        jnp.maximum(jnp.sum(chosen_mask) + jnp.sum(rejected_mask), 1))
  return loss, metrics
