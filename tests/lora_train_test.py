"""LoRA and frozen-parameter training through the one trainer: what moves, what the optimizer holds, what
checkpoints hold, config errors, and the exports a LoRA run gives (goldens: PEFT / transformers in torch, the HF
files the base was read from, numpy).
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import transformers
from flax import nnx

import models_golden as g
import train_common as tc
from tregjax import errors, export as export_lib
from tregjax import models
from tregjax import parallel
from tregjax import training
from tregjax.training import checkpoint as ckpt_lib
from tregjax.training import model_init
from tregjax.training import config as config_lib

pytestmark = pytest.mark.filterwarnings("ignore")
LORA = {"model.lora.rank": 4, "model.lora.alpha": 8.0, "optimizer.schedule": "constant"}


def _flat(state) -> dict[str, np.ndarray]:
  return {"/".join(str(k) for k in p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _hf_base(tmp_path) -> str:
  """A tiny random Llama saved by transformers (vocab 256 covers the test data's 128 ids), with a word-level
  tokenizer beside it (export copies the run's tokenizer)."""
  import tokenizers
  path = g.save_hf(g.build_hf(g.LLAMA, seed=11), tmp_path / "base")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(path)
  return path


def _config(hf_path: str, **overrides):
  config = tc.tiny_config(**{**LORA, **overrides})
  config.model.overrides = {}
  config.model.hf_path = hf_path
  return config


def test_lora_run_moves_only_adapters_and_base_stays_bitwise_the_hf_files(tmp_path):
  base_dir = _hf_base(tmp_path)
  summary = training.run(_config(base_dir, **{"train.steps": 3}), str(tmp_path / "run"), data_factory=tc.array_data)
  state = summary.state
  params, extra = _flat(state.params), _flat(state.extra)
  assert params and all(re.search(r"_lora/lora_[ab]$", k) for k in params)  # 7 targets x 2 factors
  assert len(params) == 14
  assert all(np.abs(v).max() > 0 for k, v in params.items() if k.endswith("lora_b"))  # B left zero: it trained
  # No optimizer state for the base: every Adam moment has an adapter's shape.
  moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert len(moments) == 2 * len(params)
  # The frozen base is bitwise the float32 tensors transformers wrote (HF [out, in] -> ours [in, out]).
  hf = safetensors.numpy.load_file(os.path.join(base_dir, "model.safetensors"))
  q = extra["model/layers/attn/q_proj"]  # [L, D, N, H]
  for i in range(q.shape[0]):
    np.testing.assert_array_equal(q[i].reshape(q.shape[1], -1).T, hf[f"model.layers.{i}.self_attn.q_proj.weight"])
  np.testing.assert_array_equal(extra["model/embed_tokens"], hf["model.embed_tokens.weight"])


def test_lora_base_in_bfloat16_adapters_and_moments_in_float32(tmp_path):
  config = tc.tiny_config(**{**LORA, "train.steps": 2, "model.frozen_param_dtype": "bfloat16"})
  summary = training.run(config, str(tmp_path / "run"), data_factory=tc.array_data)
  state = summary.state
  assert {v.dtype for v in _flat(state.extra).values()} == {np.dtype(jnp.bfloat16)}
  assert {v.dtype for v in _flat(state.params).values()} == {np.dtype(np.float32)}
  assert {x.dtype for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0} == {np.dtype(np.float32)}
  assert np.isfinite(summary.final_metrics["loss/total"])


def test_fresh_lora_policy_starts_at_the_base_same_first_loss_as_full_run(tmp_path):
  """B = 0: the first step's forward (loss, rewards) is the full run's, bit for bit: the reference of a LoRA run is
  its base, which the scoring pass already scored."""
  full = training.run(tc.tiny_config(**{"train.steps": 1}), str(tmp_path / "full"), data_factory=tc.array_data)
  lo = training.run(tc.tiny_config(**{**LORA, "train.steps": 1}), str(tmp_path / "lora"), data_factory=tc.array_data)
  for k in ("loss/total", "rewards/margin", "rewards/chosen"):
    assert lo.final_metrics[k] == full.final_metrics[k], k


def test_freeze_regex_keeps_matches_bitwise_and_gives_them_no_optimizer_state(tmp_path):
  config = tc.tiny_config(**{"train.steps": 3, "train.freeze": r"embed_tokens|model/layers/attn/"})
  summary = training.run(config, str(tmp_path / "run"), data_factory=tc.array_data)
  params, extra = _flat(summary.state.params), _flat(summary.state.extra)
  assert set(extra) == {"model/embed_tokens"} | {f"model/layers/attn/{n}_proj" for n in "qkvo"}
  # The initial values: the trainer's jitted random init (eager init differs from it in the last ulp).
  init_params, init_extra = jax.jit(lambda: model_init.random_init(config, model_init.model_config(config)))()
  init = _flat(init_params) | _flat(init_extra)
  for k, v in extra.items():
    np.testing.assert_array_equal(v, init[k], err_msg=k)
  for k, v in params.items():  # everything else trained
    assert not np.array_equal(v, init[k]), k
  moments = [x for x in jax.tree.leaves(summary.state.opt_state) if np.ndim(x) > 0]
  assert len(moments) == 2 * len(params)


@pytest.mark.parametrize("key,value,message", [
    ("model.lora.dropout", 1.0, "config.model.lora.dropout"),
    ("model.lora.targets", "embed_tokens", "config.model.lora.targets"),
    ("model.lora.rank", -1, "config.model.lora.rank"),
    ("model.frozen_param_dtype", "int8", "config.model.frozen_param_dtype"),
    ("train.freeze", "(", "config.train.freeze"),
])
def test_bad_lora_and_freeze_settings_are_config_errors_naming_the_key(key, value, message):
  config = tc.tiny_config(**{**LORA, key: value})
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    config_lib.validate(config, 1, check_data=False)


def test_freeze_matching_nothing_or_everything_is_an_error(tmp_path):
  for regex, message in (("no_such_param", "matches no parameter"), (".", "freezes every parameter")):
    with pytest.raises(errors.ConfigError, match=message):
      training.run(tc.tiny_config(**{"train.freeze": regex}), str(tmp_path / regex), data_factory=tc.array_data)


def test_lora_export_merged_and_peft_reproduce_the_trained_logits_and_import_continues(tmp_path):
  base_dir = _hf_base(tmp_path)
  workdir = str(tmp_path / "run")
  summary = training.run(_config(base_dir, **{"train.steps": 3, "model.lora.targets": "attention"}), workdir,
                         data_factory=tc.array_data)
  trained = nnx.merge(summary.graphdef, summary.state.params, summary.state.extra)
  want = np.asarray(trained(jnp.asarray(g.TOKENS), segment_ids=jnp.asarray(g.SEGMENTS)))
  valid = g.SEGMENTS.astype(bool)
  # Only adapters (and optimizer state) in the checkpoint.
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=1, async_save=False)
  saved = ckpt_lib.tree_shapes(ckpt.manager.item_metadata(3).state)
  ckpt.close()
  assert saved and not any("embed_tokens" in k or k.endswith("attn/q_proj") for k in saved)

  merged_dir, adapter_dir = str(tmp_path / "merged"), str(tmp_path / "adapter")
  export_lib.export(workdir, merged_dir, adapter_out=adapter_dir)
  hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager")
  np.testing.assert_allclose(g.hf_logits(hf_merged, g.TOKENS, g.SEGMENTS)[valid], want[valid], atol=1e-4, rtol=0)
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    assert json.load(f)["base_model_name_or_path"] == base_dir
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
  peft_model = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
  np.testing.assert_allclose(g.hf_logits(peft_model, g.TOKENS, g.SEGMENTS)[valid], want[valid], atol=1e-4, rtol=0)

  # Scoring / generation read the adapter directory as a model path (base + adapter in the forward).
  scored = models.from_pretrained(adapter_dir, dtype=jnp.float32)
  got = np.asarray(scored(jnp.asarray(g.TOKENS), segment_ids=jnp.asarray(g.SEGMENTS)))
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-5, rtol=0)
  # Continue training from the PEFT directory: the run starts from exactly the exported adapters.
  cont = _config(base_dir, **{"model.lora.targets": "attention", "model.lora.init_from": adapter_dir})
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  _, params, _ = model_init.build_model_state(cont, model_init.model_config(cont), mesh)
  for k, v in _flat(params).items():
    np.testing.assert_array_equal(v, _flat(summary.state.params)[k], err_msg=k)
  bad = _config(base_dir, **{"model.lora.rank": 8, "model.lora.init_from": adapter_dir})
  with pytest.raises(errors.ConfigError, match=r"config.model.lora.rank=8 .* has 4"):
    config_lib.validate(bad, 1, check_data=False)


def test_freeze_regex_over_layer_indices_keeps_those_layers_bitwise(tmp_path):
  """Layers are stacked; `model/layers/0/...` freezes layer 0's slice: no gradient, no update, no weight decay."""
  config = tc.tiny_config(**{"train.steps": 3, "train.freeze": r"model/layers/0/"})
  summary = training.run(config, str(tmp_path / "run"), data_factory=tc.array_data)
  params = _flat(summary.state.params)
  init_params, _ = jax.jit(lambda: model_init.random_init(config, model_init.model_config(config)))()
  init = _flat(init_params)
  for k, v in params.items():
    if k.startswith("model/layers/"):
      np.testing.assert_array_equal(v[0], init[k][0], err_msg=k)  # layer 0 frozen
      assert not np.array_equal(v[1], init[k][1]), k  # layer 1 trained
    else:
      assert not np.array_equal(v, init[k]), k
