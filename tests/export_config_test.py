"""What vLLM reads from an export's config.json survives the export: architectures, torch_dtype (the written dtype),
the Llama-3 rope settings (rope_theta and the `rope_scaling` dict) and a list of eos ids, as the base model's
config.json has them; generation_config.json is copied byte for byte and the tokenizer files come along.

Golden: transformers' own readers (AutoConfig, GenerationConfig, AutoTokenizer) of the base directory, and the base
model's weights (the run is initialised from it and not trained).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                          LlamaForCausalLM)

sys.path.insert(0, os.path.dirname(__file__))
import data_common as dc  # noqa: E402
import train_common as tc  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        "rope_type": "llama3"}

BUILD = r"""
import os, sys
import jax
import train_common as tc
from tregjax import parallel
from tregjax.training import checkpoint as ckpt_lib, trainer
workdir, base = sys.argv[1], sys.argv[2]
c = tc.tiny_config(**{"model.hf_path": base, "model.preset": "", "model.overrides": {}, "model.dtype": "bfloat16"})
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "config.json"), "w") as f:
  f.write(c.to_json_best_effort(indent=2))
program = trainer.build(c, parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=1, async_save=False)
ckpt.save(1, program.init(), {}, {"step": 1}, force=True)
ckpt.close()
"""


def test_export_config_holds_what_vllm_reads(tmp_path):
  base = str(tmp_path / "base")
  tok = AutoTokenizer.from_pretrained(dc.byte_level_bpe(str(tmp_path / "tok")))
  eos = [tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")]
  torch.manual_seed(0)
  ref = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     rope_theta=500000.0, rope_scaling=dict(ROPE), bos_token_id=eos[0],
                                     eos_token_id=eos, pad_token_id=0, tie_word_embeddings=False)).eval()
  ref.save_pretrained(base)
  tok.save_pretrained(base)
  GenerationConfig(bos_token_id=eos[0], eos_token_id=eos, do_sample=True, temperature=0.6,
                   top_p=0.9).save_pretrained(base)
  env = tc.worker_env()
  env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__)) + os.pathsep + env["PYTHONPATH"]
  workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
  proc = subprocess.run([sys.executable, "-c", BUILD, workdir, base], env=env, capture_output=True, text=True,
                        timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  proc = subprocess.run([sys.executable, "-m", "tregjax.export", f"--workdir={workdir}", f"--out={out}"], env=env,
                        capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]

  want, got = AutoConfig.from_pretrained(base), AutoConfig.from_pretrained(out)
  assert got.architectures == ["LlamaForCausalLM"]
  with open(os.path.join(out, "config.json")) as f:
    raw = json.load(f)
  assert raw["torch_dtype"] == "bfloat16"  # the run's compute dtype, the default --dtype
  assert list(got.eos_token_id) == eos and got.bos_token_id == eos[0]
  assert raw["rope_theta"] == 500000.0
  assert {k: raw["rope_scaling"][k] for k in ROPE} == ROPE
  for key in ("rope_theta", "rope_scaling", "max_position_embeddings", "num_key_value_heads", "head_dim",
              "vocab_size", "tie_word_embeddings"):
    assert getattr(got, key, None) == getattr(want, key, None), key
  with open(os.path.join(base, "generation_config.json"), "rb") as f, \
       open(os.path.join(out, "generation_config.json"), "rb") as g:
    assert f.read() == g.read()
  assert GenerationConfig.from_pretrained(out).eos_token_id == eos
  assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()
  hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  for name, w in ref.state_dict().items():  # the base weights, rounded to the written bfloat16
    np.testing.assert_array_equal(hf.state_dict()[name].numpy(), w.to(torch.bfloat16).float().numpy(), err_msg=name)
