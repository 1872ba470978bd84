"""The embedded default end to end (shrunk with :runlocal), and its oracle metric against transformers in torch."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO_ROOT


def test_demo_runs_end_to_end_and_its_error_mass_matches_torch(tmp_path):
  workdir = tmp_path / "demo"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
  proc = subprocess.run(
      [sys.executable, "-m", "tregjax.train", "--config", "configs/demo.py:runlocal", "--workdir", str(workdir),
       "--config.logging.progress_bar=False"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "DPO-REG error mass" in proc.stdout and "token-reward source" in proc.stdout
  results = json.loads((workdir / "results.json").read_text())
  assert set(results["policies"]) == {"reference", "dpo", "dpo_reg", "dpo_reg_oracle"}
  for arm in ("dpo", "dpo_reg", "dpo_reg_oracle"):
    assert results["arms"][arm]["step"] == 4
    assert 0.0 <= results["policies"][arm]["error_mass"] <= 1.0
  # The token-credit table: the oracle's own rewards separate its truth perfectly (AUC 1 is an exact check that the
  # runner pairs every cache's rewards with the right tokens); every source was scored on the same responses.
  credit = results["token_credit"]["sources"]
  assert set(credit) == {"contrastive", "dpo_implicit", "r3hf", "oracle", "confidence", "tisdpo_weight", "ref_logprob",
                         "chance"}
  assert credit["oracle"]["auc"] == 1.0 and credit["oracle"]["low"] == 1.0
  assert credit["oracle"]["mean_correct"] == 0.5 and credit["oracle"]["mean_error"] == -0.5
  for source in credit.values():
    assert source["low"] <= source["auc"] <= source["high"]
  for artifact in ("plot.png", "heatmap.html"):
    assert (workdir / artifact).stat().st_size > 1000
  # A second run reuses every stage (no DONE marker rewritten: nothing retrained or rescored) and rebuilds the same
  # report.
  markers = {p: p.stat().st_mtime_ns for p in workdir.rglob("DONE")}
  assert len(markers) >= 9  # world, reference, 5 scored caches, 3 arms, the reward model
  again = subprocess.run(
      [sys.executable, "-m", "tregjax.train", "--config", "configs/demo.py:runlocal", "--workdir", str(workdir),
       "--config.logging.progress_bar=False"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("DONE")} == markers
  assert json.loads((workdir / "results.json").read_text())["policies"] == results["policies"]
  ref = results["policies"]["reference"]
  assert -0.5 <= ref["self_generated_reward_mean_error"] <= 0.5

  # Independent golden: the exported reference in transformers (torch) on the same held-out correct walks.
  import torch
  import transformers
  from tregjax.synthetic import world as w
  sys.path.insert(0, os.path.join(REPO_ROOT, "configs"))
  import demo as demo_config  # configs/demo.py
  demo = demo_config.get_config("runlocal").demo
  world = w.World(demo.num_symbols, demo.response_length, demo.world_seed)
  hf_dir = workdir / "reference" / "hf"
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  rng = np.random.default_rng(demo.world_seed + 99)
  masses = []
  for _ in range(demo.eval_prompts):
    task, start = w.TASKS[rng.integers(2)], int(rng.integers(world.num_symbols))
    text = tok.apply_chat_template([{"role": "user", "content": w.prompt_text(task, start)}], tokenize=False,
                                   add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    response = [tok.convert_tokens_to_ids(str(t)) for t in world.correct_response(task, start)]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
      probs = torch.softmax(model(ids).logits[0].double(), -1)
    for i, token in enumerate(response):
      masses.append(1.0 - float(probs[len(prompt) - 1 + i, token]))
  np.testing.assert_allclose(ref["error_mass"], np.mean(masses), rtol=1e-4)

  # The generated-error metric: the reference's greedy walks equal transformers' greedy `generate`, except where its
  # top-2 logits are within 1e-4 (a float32 tie either side may break), and the oracle counts their errors.
  eot = tok.convert_tokens_to_ids(w.EOS)
  rng = np.random.default_rng(demo.world_seed + 99)
  compared, errors = 0, []
  for row in range(demo.eval_prompts):
    task, start = w.TASKS[rng.integers(2)], int(rng.integers(world.num_symbols))
    text = tok.apply_chat_template([{"role": "user", "content": w.prompt_text(task, start)}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
      out = model.generate(ids, max_new_tokens=demo.response_length + 1, do_sample=False, eos_token_id=eot,
                           pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True)
    new = [int(t) for t in out.sequences[0, ids.shape[1]:] if int(t) != eot]
    words = tok.convert_ids_to_tokens(new)
    errors.append(world.generated_errors(task, start, words))
    gaps = [float(np.diff(np.sort(s[0].numpy())[-2:])[0]) for s in out.scores]
    if min(gaps) > 1e-4:
      compared += 1
      assert ref["greedy_walks"][row] == " ".join(words), row
  assert compared >= demo.eval_prompts - 2
  # a walk left out of the comparison can move the rate by at most 1 / eval_prompts
  np.testing.assert_allclose(ref["greedy_error_rate"], np.mean(errors), rtol=0,
                             atol=(demo.eval_prompts - compared) / demo.eval_prompts + 1e-12)
  for arm in ("reference", "dpo", "dpo_reg"):
    assert 0.0 <= results["policies"][arm]["sampled_error_rate"] <= 1.0


def test_demo_token_logps_compile_once_per_shape_and_equal_full_logits():
  """The evaluation's token log-probs take the weights as an argument: two models of one shape share one compile (a
  closure over the model would compile per call), and the values are log_softmax(logits)[labels]."""
  import jax
  from flax import nnx
  from tregjax import models
  from tregjax.models.config import ModelConfig
  from tregjax.synthetic import demo
  cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=8)
  a, b = (models.CausalLM(cfg, rngs=nnx.Rngs(seed), dtype=np.float32) for seed in (0, 1))
  tokens = np.random.default_rng(0).integers(1, 50, (2, 10)).astype(np.int32)
  labels = np.concatenate([tokens[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
  segments = np.ones_like(tokens)
  before = demo.token_logps_compiled._cache_size()  # pylint: disable=protected-access
  got = [demo.token_logps(m, tokens, labels, segments) for m in (a, b, a)]
  assert demo.token_logps_compiled._cache_size() == before + 1  # pylint: disable=protected-access
  assert not np.allclose(got[0], got[1]) and np.array_equal(got[0], got[2])
  full = np.asarray(jax.nn.log_softmax(np.asarray(a(tokens, segment_ids=segments), np.float32), axis=-1))
  np.testing.assert_allclose(got[0], np.take_along_axis(full, labels[..., None], axis=-1)[..., 0], atol=1e-5)
