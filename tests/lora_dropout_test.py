"""LoRA dropout (PEFT's `lora_dropout`): what it drops, where, and when.

Goldens: the definition of inverted dropout on the adapter's input, checked through an adapter whose A and B are
identities (so its output *is* the dropped input times α/r), a binomial interval for the dropped fraction, PEFT in
torch (in eval mode dropout is the identity, so the keyless forward must equal PEFT's logits), and the run itself
(the base stays bitwise the HF files; a dropout run's adapters differ from a no-dropout run's).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest

import models_golden as g
import train_common as tc
from lora_peft_test import TARGET_SETS, VALID
from lora_train_test import _config, _flat, _hf_base
from tregjax import models, training
from tregjax.models import adapters
from tregjax.models import lora
from tregjax.models.config import LORA_TARGETS

pytestmark = pytest.mark.filterwarnings("ignore")
P = 0.3


def _identity_adapter(d: int, salt: int, dropout: float = P) -> lora.Adapter:
  """An adapter on a [d] -> [d] projection with A = B = I and α = r = d: its output is drop(x) itself."""
  adapter = lora.Adapter((d, d), ("embed", "embed"), in_ndim=1, rank=d, alpha=float(d), dropout=dropout, salt=salt,
                         param_dtype=jnp.float32)
  adapter.lora_a[...] = jnp.eye(d)
  adapter.lora_b[...] = jnp.eye(d)
  return adapter


def test_dropout_is_inverted_dropout_on_the_adapter_input_only_with_a_key():
  d, rows = 64, 400
  x = jax.random.uniform(jax.random.key(0), (rows, d), minval=0.5, maxval=1.5)
  adapter = _identity_adapter(d, salt=0)
  np.testing.assert_array_equal(np.asarray(adapter(x)), np.asarray(x))  # no key: no dropout
  out = np.asarray(adapter(x, jax.random.key(1)))
  kept = out != 0
  # Every entry is either dropped or the input scaled by 1 / (1 - p) (float32 rounding of one division).
  np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / (1 - P), rtol=1e-6)
  n = out.size
  dropped = 1.0 - kept.mean()
  half_width = 4.0 * math.sqrt(P * (1 - P) / n)  # 4 sigma of a binomial proportion over 25,600 entries
  assert abs(dropped - P) < half_width, (dropped, P, half_width)
  # A new key draws a new mask; the same key the same one.
  again = np.asarray(adapter(x, jax.random.key(1)))
  np.testing.assert_array_equal(out, again)
  assert (np.asarray(adapter(x, jax.random.key(2))) != out).any()


def test_each_projection_draws_its_own_mask_under_one_layer_key():
  d = 64
  x = jnp.ones((50, d))
  key = jax.random.key(3)
  masks = [np.asarray(_identity_adapter(d, salt=s)(x, key)) != 0 for s in range(len(LORA_TARGETS))]
  for i in range(len(masks)):
    for j in range(i):
      assert (masks[i] != masks[j]).any(), (LORA_TARGETS[i], LORA_TARGETS[j])


def _adapted(tmp_path, dropout: float):
  """(PEFT model in eval mode with random A and B and `lora_dropout=dropout`, its tregjax import, the base dir)."""
  import torch  # pylint: disable=import-outside-toplevel
  hf = g.build_hf(g.LLAMA, seed=0)
  base_dir = g.save_hf(hf, tmp_path / "base")
  conf = peft.LoraConfig(r=4, lora_alpha=12.0, target_modules=TARGET_SETS["all_linear"], lora_dropout=dropout)
  pm = peft.get_peft_model(hf, conf)
  gen = torch.Generator().manual_seed(7)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  pm.eval()
  pm.save_pretrained(tmp_path / "adapter")
  base = models.from_pretrained(base_dir, dtype=jnp.float32)
  return pm, adapters.load_adapter(base, str(tmp_path / "adapter")), base_dir


def test_keyless_forward_is_peft_eval_and_only_adapters_see_the_key(tmp_path):
  pm, ours, base_dir = _adapted(tmp_path, dropout=P)
  assert ours.config.lora_dropout == P  # read from adapter_config.json
  tokens, segments = jnp.asarray(g.TOKENS), jnp.asarray(g.SEGMENTS)
  want = g.hf_logits(pm, g.TOKENS, g.SEGMENTS)
  plain = np.asarray(ours.unembed(ours.hidden_states(tokens, segment_ids=segments)))
  np.testing.assert_allclose(plain[VALID], want[VALID], atol=1e-4)  # evaluation, scoring, decoding: no dropout
  key = jax.random.key(5)
  h1 = np.asarray(ours.hidden_states(tokens, segment_ids=segments, dropout_key=key))
  h2 = np.asarray(ours.hidden_states(tokens, segment_ids=segments, dropout_key=key))
  h3 = np.asarray(ours.hidden_states(tokens, segment_ids=segments, dropout_key=jax.random.key(6)))
  np.testing.assert_array_equal(h1, h2)
  assert np.abs(h1 - h3)[VALID].max() > 1e-3
  # The base projections see their input whole: with fresh adapters (B = 0) a key changes nothing, and the
  # reference of a LoRA run (the base, adapters off) has nothing to drop.
  base = models.from_pretrained(base_dir, dtype=jnp.float32)
  fresh = adapters.add_adapters(base, rank=4, alpha=8.0, targets="all_linear", dropout=0.5)
  for model in (base, fresh):
    np.testing.assert_array_equal(np.asarray(model.hidden_states(tokens, segment_ids=segments)),
                                  np.asarray(model.hidden_states(tokens, segment_ids=segments, dropout_key=key)))
  # Exported adapters say how they were trained.
  adapters.save_adapter(ours, str(tmp_path / "out"))
  assert adapters.read_adapter_config(str(tmp_path / "out"))["lora_dropout"] == P


def test_a_dropout_run_trains_other_adapters_than_a_plain_one_and_keeps_the_base(tmp_path):
  hf_path = _hf_base(tmp_path)
  runs = {}
  for p in (0.0, 0.25):
    workdir = str(tmp_path / f"run_{p}")
    result = training.run(_config(hf_path, **{"model.lora.dropout": p, "train.steps": 3}), workdir,
                          data_factory=tc.array_data)
    runs[p] = (_flat(result.state.params), _flat(result.state.extra), tc.metrics_by_step(workdir))
  (a0, base0, m0), (a1, base1, m1) = runs[0.0], runs[0.25]
  assert sorted(a0) == sorted(a1) and all("_lora" in k for k in a1)
  for k in base0:
    np.testing.assert_array_equal(base0[k], base1[k], err_msg=k)  # the frozen base never moves
  # Step 1 starts at B = 0, where dropping A's input cannot change the loss; the updates it takes differ.
  assert m0[1]["loss/total"] == m1[1]["loss/total"]
  assert m0[3]["loss/total"] != m1[3]["loss/total"]
  assert all(np.abs(a0[k] - a1[k]).max() > 0 for k in a0 if k.endswith("lora_b"))
