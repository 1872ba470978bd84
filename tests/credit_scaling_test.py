"""The token-credit-across-sizes program (#28) at its CI size (configs/credit_scaling.py:tiny, SmolLM2 only) through
the real command line: every stage's artifact, every sample scored, and the reported figures recomputed here from
the stages' own outputs (greedy answers re-read with a plain regex; AUCs by brute-force pair counting)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

from tregjax.experiments import runner
from tregjax.tasks import arith


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("credit") / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
  proc = subprocess.run([sys.executable, "-m", "tregjax.train", "--config", "configs/credit_scaling.py:tiny",
                         "--workdir", str(workdir)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return workdir, json.loads((workdir / "results.json").read_text()), proc.stdout


def _jsonl(path):
  return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_artifacts_and_every_sample_scored(tiny_run):
  workdir, results, stdout = tiny_run
  model = workdir / "smollm2"
  for path in ("problems/train.jsonl", "problems/eval.jsonl", "samples/records.jsonl", "credit_pairs/pairs.jsonl",
               "scored/contrastive/cache/cache_meta.json", "scored/confidence/cache/cache_meta.json",
               "paper/scored/contrastive/cache/cache_meta.json", "greedy/none/records.jsonl",
               "greedy/better/records.jsonl", "greedy/worse/records.jsonl"):
    assert (model / path).is_file(), path
  assert (workdir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "token-credit ROC-AUC" in stdout and "self-teacher gap" in stdout
  records = _jsonl(model / "samples/records.jsonl")
  samples = [t for r in records for t in r["all_generated_responses"]]
  assert len(samples) == 3 * 6
  pairs = _jsonl(model / "credit_pairs/pairs.jsonl")
  # Every distinct non-empty sample of every problem is on one side of a pair (not only the best/worst of a group).
  covered = {(json.dumps(p["prompt"]), side) for p in pairs for side in (p["chosen"], p["rejected"])}
  for r in records:
    texts = [t for t in r["all_generated_responses"] if t.strip()]
    if len(set(texts)) > 1:
      assert {(json.dumps(r["prompt"]), t) for t in texts} <= covered
  (entry,) = results["models"]
  assert entry["token_credit"]["counts"]["responses"] == 2 * len(pairs)
  assert entry["samples"] == dict(finished=sum(f for r in records for f in r["all_finished"]), samples=len(samples))
  assert entry["parameters"] == 134_515_008  # SmolLM2-135M's tensors (tied head counted once)
  assert entry["cpu_seconds"] > 0 and entry["wall_seconds"] > 0


def _brute_auc(scores, labels):
  pos, neg = scores[labels > 0], scores[labels < 0]
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return wins / (len(pos) * len(neg))


def test_auc_of_each_source_is_its_own_cache_against_the_oracle(tiny_run):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  workdir, results, _ = tiny_run
  model = workdir / "smollm2"
  tok = AutoTokenizer.from_pretrained(model / "reference/hf", local_files_only=True)
  answers = {r["prompt"][-1]["content"]: r["answer"] for r in _jsonl(model / "problems/train.jsonl")}
  # A sample the model did not end within its budget has no final answer to grade (its equations still count).
  finished = {(r["prompt"][-1]["content"], t.strip()): f for r in _jsonl(model / "samples/records.jsonl")
              for t, f in zip(r["all_generated_responses"], r["all_finished"])}
  sources = results["models"][0]["token_credit"]["sources"]
  flat = {}
  for name, cache in (("contrastive", "scored/contrastive"), ("contrastive_paper", "paper/scored/contrastive"),
                      ("confidence", "scored/confidence")):
    rows = runner.cache_rows(str(model / cache / "cache"))
    labels, rewards = [], []
    for row in rows:
      question = json.loads(row["prompt_messages"])[-1]["content"]
      for side in ("chosen", "rejected"):
        ids = row[f"{side}_ids"].tolist()
        done = finished[(question, tok.decode(ids, skip_special_tokens=True).strip())]
        labels.append(arith.token_truth(tok, ids, answers[question], finished=done))
        rewards.append(np.asarray(row[f"{side}_token_rewards"], np.float64))
    labels, flat[name] = np.concatenate(labels), np.concatenate(rewards)
    counts = results["models"][0]["token_credit"]["counts"]
    assert (int((labels > 0).sum()), int((labels < 0).sum())) == (counts["correct_tokens"], counts["error_tokens"])
    assert sources[name]["auc"] == pytest.approx(_brute_auc(flat[name], labels), abs=1e-12), name
    assert sources[name]["low"] <= sources[name]["auc"] <= sources[name]["high"]
  # The paper's prompts are another source, not the task prompts' cache under a second name.
  assert not np.allclose(flat["contrastive"], flat["contrastive_paper"])


def test_greedy_accuracy_and_the_self_teacher_gap_from_the_answers(tiny_run):
  workdir, results, _ = tiny_run
  model = workdir / "smollm2"
  answers = {r["prompt"][-1]["content"]: r["answer"] for r in _jsonl(model / "problems/eval.jsonl")}
  correct = {}
  for condition, system in (("none", None), ("better", arith.SYSTEM_CAREFUL), ("worse", arith.SYSTEM_CARELESS)):
    records = sorted(_jsonl(model / f"greedy/{condition}/records.jsonl"), key=lambda r: r["prompt"][-1]["content"])
    assert len(records) == 6
    assert all((r["prompt"][0]["content"] == system) if system else r["prompt"][0]["role"] == "user"
               for r in records)
    numbers = [re.findall(r"(?<![\d.])\d+(?:\.\d+)?", r["all_generated_responses"][0].replace(",", ""))
               for r in records]  # the last number stated is the answer; a decimal one is never right
    correct[condition] = np.array([bool(n) and n[-1].isdigit() and int(n[-1]) == answers[r["prompt"][-1]["content"]]
                                   for n, r in zip(numbers, records)], np.float64)
    got = results["models"][0]["greedy"][condition]
    assert got["correct"] == int(correct[condition].sum()) and got["problems"] == 6
    assert got["accuracy"] == pytest.approx(correct[condition].mean())
    assert got["low"] <= got["accuracy"] <= got["high"]
  gap = results["models"][0]["greedy"]["better - none"]
  assert gap["mean"] == pytest.approx((correct["better"] - correct["none"]).mean())


def test_auc_difference_across_sizes_against_brute_force_pair_counting():
  from tregjax.tasks import credit  # pylint: disable=g-import-not-at-top

  def brute(scores, labels):
    pos, neg = scores[labels > 0], scores[labels < 0]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])

  rng = np.random.default_rng(1)
  small = dict(scores=rng.normal(size=60), labels=rng.choice([-1, 0, 1], 60), groups=np.repeat(np.arange(12), 5))
  large = dict(labels=rng.choice([-1, 0, 1], 80), groups=np.repeat(np.arange(16), 5))
  large["scores"] = large["labels"] * 0.8 + rng.normal(size=80)  # a model whose scores see the truth
  mean, low, high = credit.auc_difference(small, large, seed=0, resamples=300)
  assert mean == pytest.approx(brute(large["scores"], large["labels"]) - brute(small["scores"], small["labels"]))
  assert low < mean < high and high - low < 1.0
  results = [dict(model="b", parameters=2), dict(model="a", parameters=1)]
  scores = [dict(labels=x["labels"], groups=x["groups"], sources={s: x["scores"] for s in credit.SIZE_SOURCES})
            for x in (large, small)]
  diffs = credit.size_differences(list(zip(results, scores)))
  assert list(diffs) == ["b - a"] and diffs["b - a"]["confidence"]["mean"] == pytest.approx(mean)
