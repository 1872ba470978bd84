"""Sequence-level preference losses, per example. Each returns a `PreferenceOutput`; reduction happens in objective.py."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tregjax.losses import _checks


class PreferenceOutput(NamedTuple):
  """Per-example results, all [B].

  `logits` is the preference logit z whose sigmoid is the modelled P(y_w ≻ y_l); `sequence_weight` reads σ(−z) from it.
  The rewards are the implicit ones TRL reports: β·(π − π_ref) for DPO/IPO, β·avg log π for SimPO.
  """
  loss: jax.Array
  logits: jax.Array
  chosen_rewards: jax.Array
  rejected_rewards: jax.Array


def _floats(**arrays):
  _checks.check_same_shape(**arrays)
  for name, x in arrays.items():
    _checks.check_rank(name, x, 1, "a [B] vector of per-example sequence log-probs")
  return [_checks.as_float(x) for x in arrays.values()]


def dpo_loss(pi_w: jax.Array,
             pi_l: jax.Array,
             ref_w: jax.Array,
             ref_l: jax.Array,
             *,
             beta: float,
             label_smoothing: float = 0.0) -> PreferenceOutput:
  """DPO (Rafailov et al. 2023, eq. 7), with cDPO label smoothing ε: −(1−ε)·logσ(z) − ε·logσ(−z).

  z = β[(π_w − ref_w) − (π_l − ref_l)]; inputs are summed response log-probs [B].
  """
  _checks.check_positive("beta", beta)
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
  pi_w, pi_l, ref_w, ref_l = _floats(pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l)
  chosen_rewards = beta * (pi_w - ref_w)
  rejected_rewards = beta * (pi_l - ref_l)
  z = chosen_rewards - rejected_rewards
  loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  return PreferenceOutput(loss, z, chosen_rewards, rejected_rewards)


def ipo_loss(pi_w: jax.Array, pi_l: jax.Array, ref_w: jax.Array, ref_l: jax.Array, *, beta: float) -> PreferenceOutput:
  """IPO (Azar et al. 2023, eq. 17): (h − 1/(2β))², h = (π_w − ref_w) − (π_l − ref_l); inputs summed log-probs [B].

  The reported logit is z = β·h (the implicit reward margin), so `sequence_weight` is defined for IPO as for DPO.
  """
  _checks.check_positive("beta", beta)
  pi_w, pi_l, ref_w, ref_l = _floats(pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l)
  h = (pi_w - ref_w) - (pi_l - ref_l)
  loss = (h - 1.0 / (2.0 * beta))**2
  return PreferenceOutput(loss, beta * h, beta * (pi_w - ref_w), beta * (pi_l - ref_l))


def simpo_loss(avg_w: jax.Array,
               avg_l: jax.Array,
               *,
               beta: float,
               gamma: float,
               label_smoothing: float = 0.0) -> PreferenceOutput:
  """SimPO (Meng et al. 2024, eq. 6): −logσ(z), z = β·avg_w − β·avg_l − γ.

  Inputs are length-averaged response log-probs [B]; γ is the absolute target margin (the release's γ/β times β).
  """
  _checks.check_positive("beta", beta)
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
  avg_w, avg_l = _floats(avg_w=avg_w, avg_l=avg_l)
  chosen_rewards = beta * avg_w
  rejected_rewards = beta * avg_l
  z = chosen_rewards - rejected_rewards - gamma
  loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  return PreferenceOutput(loss, z, chosen_rewards, rejected_rewards)


PREFERENCE_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "simpo": simpo_loss}
