"""The experiment's arms: the paper's method, baselines and ablations, each a `config.loss` override and the scored
cache it trains on; and the one way a report names a policy (`label`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: overrides of `config.loss`, and the token-reward source of the scored cache it trains on."""
  loss: Mapping[str, Any]
  rewards: str = "contrastive"
  label: str = ""


# The paper's method, baselines and ablations, TGDPO, and one arm no paper has: DPO-REG with the oracle's token truth
# as r̂ (the ceiling of token-level regularisation when the token rewards are perfect).
ARMS: dict[str, Arm] = {
    "dpo": Arm(dict(loss="dpo", regularizer="none"), label="DPO"),
    "dpo_reg": Arm(dict(loss="dpo", regularizer="treg", weighting="dynamic"), label="DPO-REG (T-REG)"),
    # SimPO's own scale: β = 2 and margin γ = 1 (γ/β = 0.5, the SimPO paper's setting for its base models); the
    # config's loss.beta is DPO's KL scale (0.1), far too small for length-averaged log-probs.
    "simpo": Arm(dict(loss="simpo", regularizer="none", beta=2.0, gamma=1.0), label="SimPO"),
    "simpo_reg": Arm(dict(loss="simpo", regularizer="treg", weighting="dynamic", beta=2.0, gamma=1.0),
                     label="SimPO-REG"),
    # TGDPO's release guides DPO with token rewards from a DPO-trained model: the DPO arm's implicit rewards.
    "tgdpo": Arm(dict(loss="tgdpo", regularizer="none"), rewards="dpo_implicit", label="TGDPO"),
    "dpo_sft": Arm(dict(loss="dpo", regularizer="sft"), label="DPO + SFT on y_w (ablation)"),
    "dpo_reg_static": Arm(dict(loss="dpo", regularizer="treg", weighting="static"),
                          label="DPO-REG, static weight (ablation)"),
    "dpo_reg_implicit": Arm(dict(loss="dpo", regularizer="treg", weighting="dynamic"), rewards="dpo_implicit",
                            label="DPO-REG, DPO-implicit r̂ (ablation)"),
    "dpo_reg_oracle": Arm(dict(loss="dpo", regularizer="treg", weighting="dynamic"), rewards="oracle",
                          label="DPO-REG, oracle r̂ (ceiling)"),
    # Token signals that need no prompt and no extra model: the reference's own confidence as T-REG's r̂ (ConfPO's
    # threshold), ConfPO itself (SimPO's β and γ, on the policy's low-confidence tokens), and TIS-DPO's importance
    # weights from the same contrastive log-prob differences T-REG squashes into r̂.
    "dpo_reg_conf": Arm(dict(loss="dpo", regularizer="treg", weighting="dynamic"), rewards="confidence",
                        label="DPO-REG, confidence r̂"),
    "confpo": Arm(dict(loss="confpo", regularizer="none", beta=2.0, gamma=1.0), label="ConfPO"),
    "tisdpo": Arm(dict(loss="tisdpo", regularizer="none"), label="TIS-DPO (prompt weights)"),
}


def label(name: str, reference: str = "reference") -> str:
  """How reports name the policy `name`: an arm's label, else `reference` (the policy every arm starts from)."""
  return ARMS[name].label if name in ARMS else reference


__all__ = ["Arm", "ARMS", "label"]
