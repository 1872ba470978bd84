"""tregjax.losses: pure, jit/vmap/grad-safe loss functions (float32 math). Imports nothing else from tregjax."""

from tregjax.losses.logprobs import (chunked_token_logps, model_token_logps, next_token_labels, sequence_logps,
                                     token_logps)
from tregjax.losses.objective import ObjectiveOptions, preference_objective
from tregjax.losses.preference import PreferenceOutput, dpo_loss, ipo_loss, simpo_loss
from tregjax.losses.token_reward import (confidence_token_rewards, confpo_loss, contrastive_token_rewards,
                                         dpo_implicit_token_rewards, r3hf_token_rewards, sequence_weight, tgdpo_loss,
                                         tisdpo_loss, tisdpo_token_weights, token_regularizer)

__all__ = [
    "ObjectiveOptions", "PreferenceOutput", "chunked_token_logps", "confidence_token_rewards", "confpo_loss",
    "contrastive_token_rewards", "dpo_implicit_token_rewards", "dpo_loss", "ipo_loss", "model_token_logps",
    "next_token_labels", "preference_objective", "r3hf_token_rewards", "sequence_logps", "sequence_weight",
    "simpo_loss", "tgdpo_loss", "tisdpo_loss", "tisdpo_token_weights", "token_logps", "token_regularizer"
]
