"""The real-model experiment at its CI size (configs/smollm2_arith.py:tiny) through the real command line.

Checks every stage's artifact (problems, the SmolLM2 reference as an HF directory, on-policy samples and pairs, the
scored caches, the arms, the greedy evaluations, results.json, the plot and the heatmap) and the oracle's labels in
the scored cache: an independent digit check on the tokens the oracle labels, and AUC 1 for its own rewards.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("arith") / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
  proc = subprocess.run([sys.executable, "-m", "tregjax.train", "--config", "configs/smollm2_arith.py:tiny",
                         "--workdir", str(workdir), "--config.logging.progress_bar=False"],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return workdir, proc.stdout


def test_every_stage_leaves_its_artifact(tiny_run):
  workdir, stdout = tiny_run
  for path in ("problems/train.jsonl", "problems/eval.jsonl", "reference/hf/config.json",
               "reference/hf/model.safetensors", "samples/records.jsonl", "samples/pairs.jsonl",
               "samples/summary.json", "scored/contrastive/cache/cache_meta.json",
               "scored/dpo_implicit/cache/cache_meta.json", "scored/oracle/cache/cache_meta.json",
               "arms/dpo/hf/model.safetensors", "arms/dpo_reg/hf/model.safetensors",
               "arms/dpo_reg_oracle/hf/model.safetensors", "eval/reference/records.jsonl", "eval/dpo/records.jsonl",
               "results.json", "plot.png", "heatmap.html"):
    assert (workdir / path).is_file(), path
  train = [json.loads(line) for line in (workdir / "problems/train.jsonl").open()]
  held_out = [json.loads(line) for line in (workdir / "problems/eval.jsonl").open()]
  assert not {r["prompt"][-1]["content"] for r in train} & {r["prompt"][-1]["content"] for r in held_out}
  summary = json.loads((workdir / "samples/summary.json").read_text())
  assert summary["samples"] == 4 * len(train) and summary["pairs"] + summary["all_equal"] <= len(train)
  results = json.loads((workdir / "results.json").read_text())
  assert set(results["policies"]) == {"reference", "dpo", "dpo_reg", "dpo_reg_oracle"}
  for policy in results["policies"].values():
    assert policy["problems"] == len(held_out)
    assert policy["accuracy_low"] <= policy["accuracy"] <= policy["accuracy_high"]
  assert "greedy accuracy on" in stdout and "token-reward source" in stdout


def test_oracle_labels_in_the_scored_cache(tiny_run):
  """The oracle arm's rewards: ±0.5 only on tokens made of digits (results and final answers), 0 elsewhere; and the
  token-credit table gives the oracle AUC 1 where it found both kinds of token."""
  workdir, _ = tiny_run
  from transformers import AutoTokenizer
  from tregjax.data import tfds_builder
  tok = AutoTokenizer.from_pretrained(workdir / "reference/hf")
  meta = json.loads((workdir / "scored/oracle/cache/cache_meta.json").read_text())
  src = tfds_builder.data_source(str(workdir / "scored/oracle/cache" / meta["dataset"]), "train")
  labelled = 0
  for i in range(len(src)):
    for side in ("chosen", "rejected"):
      ids, rewards = src[i][f"{side}_ids"], np.asarray(src[i][f"{side}_token_rewards"])
      assert set(np.unique(rewards)) <= {-0.5, 0.0, 0.5}
      for token, reward in zip(ids, rewards):
        if reward != 0:
          labelled += 1
          assert re.search(r"\d", tok.decode([int(token)])), (tok.decode([int(token)]), reward)
  assert labelled > 0
  credit = json.loads((workdir / "results.json").read_text())["token_credit"]
  if credit["counts"]["error_tokens"] and credit["counts"]["correct_tokens"]:
    assert credit["sources"]["oracle"]["auc"] == 1.0
