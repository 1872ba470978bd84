"""Packing through the real data path: `python -m tregjax.score` → `python -m tregjax.train` with
`data.packing=True` (scored TFDS cache → grain → first-fit packed rows → trainer), on one process and on two.

Goldens: the training records read from the cache (every pair consumed once per epoch, as many pairs per step as the
step reports); transformers' own forward of the step-1 pairs, one pair per row, with the cached reference log-probs
and token rewards put through the DPO-REG formula in numpy (the step-1 loss; the policy starts from the reference),
and the same for the exported trained model over every validation pair (the packed end-of-run evaluation);
the uninterrupted run (a run resumed mid-epoch logs the same steps bitwise); the single-process run (2 processes, same
global batch of packed rows).

Tolerance of 2 processes vs 1 (their batch means are cross-process float32 sums): losses and grad norms rtol 1e-5,
reward margins atol 5e-6, the (3e-5 small) eval regulariser atol 1e-8, parameters atol 1e-6 after a 4-step epoch at
lr 1e-2 (1e-4 of one step's size; optimizer.eps = 1e-4 keeps float32 noise in near-zero gradients from becoming ±lr
sign updates in Adam's first steps)."""

import json
import os
import shutil
import subprocess
import sys
import zlib

import ml_collections
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
import train_common as tc  # noqa: E402
from train_cli_test import ROOT, _cli, _flags, world  # noqa: E402,F401  (world: the CLI tests' module fixture)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore")

CONFIG = os.path.join(ROOT, "configs", "tiny_dpo.py")
BETA, ALPHA = 0.1, 0.25  # configs/tiny_dpo.py's DPO-REG
ROWS = 2  # packed rows per global batch
# One epoch over the 15 training pairs, first-fit packed 1-3 per row of 192 tokens (7 rows: 4 steps, the last with a
# padding row, kept by drop_remainder=False); evaluation on the validation split (packed too) at the end.
PACKED = {"data.packing": "True", "data.max_segments": "4", "data.batch_size": str(ROWS), "data.buckets": "(64,192)",
          "data.drop_remainder": "False", "data.eval_split": "validation", "train.steps": "-1", "checkpoint.every": "2",
          "checkpoint.keep": "10", "optimizer.schedule": "constant", "optimizer.lr": "0.01",
          "optimizer.eps": "1e-4"}


def _train_args(world, workdir):
  return ["--config=" + CONFIG, *_flags(world, **PACKED), f"--workdir={workdir}"]


@pytest.fixture(scope="module")
def packed_run(world, tmp_path_factory):
  """The scored cache and one packed single-process CLI epoch over it."""
  _cli("tregjax.score", "--config=" + CONFIG, *_flags(world))
  workdir = str(tmp_path_factory.mktemp("packed") / "run")
  _cli("tregjax.train", *_train_args(world, workdir))
  return workdir


def _run_config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def _records(config, split: str = "train") -> list[dict]:
  from tregjax.data import tfds_builder
  source = tfds_builder.data_source(config.data.cache_dir, split)
  return [source[i] for i in range(len(source))]


def _epoch_batches(config) -> list:
  """The trainer's packed batches of epoch 0, rebuilt from the run's config (tied to the run by fingerprints)."""
  from tregjax.data import pipeline
  it = pipeline.make_iterator(config.data, split=config.data.train_split, objective=config.objective,
                              process_index=0, process_count=1, num_epochs=1)
  return list(it)


def _segments(side, row: int) -> list[tuple[int, ...]]:
  tokens, seg = np.asarray(side.tokens[row]), np.asarray(side.segment_ids[row])
  return [tuple(tokens[seg == k].tolist()) for k in range(1, int(seg.max(initial=0)) + 1)]


def _pairs_of(batch, key_to_record: dict) -> list[int]:
  """Record index of every packed pair, in row/segment order (chosen and rejected segments must agree)."""
  out = []
  for row in range(batch.chosen.tokens.shape[0]):
    chosen, rejected = _segments(batch.chosen, row), _segments(batch.rejected, row)
    assert len(chosen) == len(rejected), f"row {row}: {len(chosen)} chosen vs {len(rejected)} rejected segments"
    for c, r in zip(chosen, rejected):
      assert (c, r) in key_to_record, f"row {row}: a packed segment pair that is no record of the split"
      out.append(key_to_record[(c, r)])
  return out


def _key(rec) -> tuple:
  p = [int(x) for x in rec["prompt_ids"]]
  return tuple(p + [int(x) for x in rec["chosen_ids"]]), tuple(p + [int(x) for x in rec["rejected_ids"]])


def _hf_response_logps(model, prompt, response) -> np.ndarray:
  """float64 [len(response)]: log π(response_j | prompt, response_<j) from transformers, the pair alone in its row."""
  ids = torch.tensor(np.concatenate([prompt, response]).astype(np.int64))[None]
  with torch.no_grad():
    logits = model(ids).logits[0].double()
  logps = torch.log_softmax(logits, -1)
  n = len(prompt)
  return logps[np.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].numpy()


def _np_dpo_reg(model, recs) -> dict[str, float]:
  """DPO-REG (dynamic weight, unnormalised T-REG) of unpacked pairs, as in T-REG's paper, in numpy."""
  per_pair, reg_terms, logps_w = [], [], []
  for rec in recs:
    prompt = np.asarray(rec["prompt_ids"])
    pi_w_tok = _hf_response_logps(model, prompt, np.asarray(rec["chosen_ids"]))
    pi_l_tok = _hf_response_logps(model, prompt, np.asarray(rec["rejected_ids"]))
    z = BETA * ((pi_w_tok.sum() - float(rec["ref_chosen_logps"])) - (pi_l_tok.sum() - float(rec["ref_rejected_logps"])))
    w = 1.0 / (1.0 + np.exp(z))  # σ(−z)
    reg = -BETA * (np.dot(rec["chosen_token_rewards"], pi_w_tok) + np.dot(rec["rejected_token_rewards"], pi_l_tok))
    per_pair.append(np.logaddexp(0.0, -z) + ALPHA * w * reg)
    reg_terms.append(ALPHA * w * reg)
    logps_w.append(pi_w_tok.sum())
  return {"loss/total": float(np.mean(per_pair)), "loss/regularizer": float(np.mean(reg_terms)),
          "logps/chosen": float(np.mean(logps_w))}


def test_packed_cli_epoch_trains_every_pair_once_and_step_one_equals_the_unpacked_loss(world, packed_run):
  config = _run_config(packed_run)
  records = _records(config)
  key_to_record = {_key(r): i for i, r in enumerate(records)}
  assert len(key_to_record) == len(records) >= 12  # distinct pairs (20 records less the validation fifth)
  batches = _epoch_batches(config)
  metrics = tc.metrics_by_step(packed_run)
  assert sorted(metrics) == list(range(1, len(batches) + 1))  # train.steps=-1: one epoch of packed batches

  consumed = []
  for step, batch in enumerate(batches, start=1):
    pairs = _pairs_of(batch, key_to_record)
    consumed += pairs
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(batch.chosen.tokens)).tobytes())
    assert metrics[step]["data/fingerprint"] == float(crc), f"step {step} trained on another batch"
    assert metrics[step]["data/loss_weight"] == len(pairs), f"step {step}"
  assert sorted(consumed) == list(range(len(records)))  # each pair exactly once
  assert len(batches) < len(records) / ROWS  # rows really hold several pairs
  assert max(len(_segments(b.chosen, r)) for b in batches for r in range(ROWS)) >= 2
  assert any(len(_segments(b.chosen, r)) == 0 for b in batches for r in range(ROWS))  # a padding row weighs nothing

  hf = AutoModelForCausalLM.from_pretrained(str(world / "ref"), dtype=torch.float32).eval()
  want = _np_dpo_reg(hf, [records[i] for i in _pairs_of(batches[0], key_to_record)])
  for k, v in want.items():  # float32 packed forward vs float64 log-softmax of transformers' float32 logits
    np.testing.assert_allclose(metrics[1][k], v, rtol=2e-5, atol=1e-6, err_msg=k)
  assert abs(want["loss/regularizer"]) > 1e-4  # T-REG is on (atol 1e-6 is under 1% of it)


def test_packed_evaluation_covers_the_validation_split_and_equals_the_unpacked_loss(packed_run, tmp_path):
  """The end-of-run evaluation (packed rows of the validation split) equals transformers on the exported trained
  model, one pair per row, over every validation pair (rtol 2e-5: float32 vs float64 log-softmax)."""
  config = _run_config(packed_run)
  records = _records(config, "validation")
  assert len(records) >= 4
  with open(os.path.join(packed_run, "metrics.jsonl"), encoding="utf-8") as f:
    evals = [r for r in map(json.loads, f) if "eval/loss/total" in r]
  assert len(evals) == 1 and evals[0]["step"] == max(tc.metrics_by_step(packed_run))
  from tregjax import export  # pylint: disable=g-import-not-at-top
  trained = AutoModelForCausalLM.from_pretrained(export.export(packed_run, str(tmp_path / "hf")),
                                                 dtype=torch.float32).eval()
  want = _np_dpo_reg(trained, records)
  assert abs(want["loss/total"] - np.log(2)) > 1e-3  # the policy moved away from the reference
  for k, v in want.items():
    np.testing.assert_allclose(evals[0][f"eval/{k}"], v, rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("packing", [False, True])
def test_evaluation_batches_keep_the_remainder_under_drop_remainder(packed_run, packing):
  """drop_remainder is for training; an evaluation that dropped a short last batch would score a subset (or, with
  fewer rows than a batch, nothing). Every validation pair is evaluated exactly once."""
  from tregjax.training import trainer  # pylint: disable=g-import-not-at-top
  config = _run_config(packed_run)
  records = _records(config, "validation")
  # Unpacked: a short last batch (5 pairs, batches of 4); packed: fewer rows (<= pairs) than one batch of 8.
  config.data.drop_remainder, config.data.packing, config.data.batch_size = True, packing, 8 if packing else 4
  assert len(records) % 4 and len(records) < 8
  key_to_record = {_key(r): i for i, r in enumerate(records)}
  batches = list(trainer.default_data(config, "validation", 0, 1))
  assert sorted(i for b in batches for i in _pairs_of(b, key_to_record)) == list(range(len(records)))


def test_packed_cli_run_resumed_mid_epoch_continues_with_the_same_packed_rows(world, packed_run, tmp_path):
  """A run killed after its step-2 checkpoint (later checkpoints and the metrics removed) resumes with the grain
  iterator at step 2: the same packed rows (fingerprints, pair counts) and bitwise the same losses to the end."""
  full = tc.metrics_by_step(packed_run)
  last = max(full)
  assert last >= 4, "the epoch must outlast the step-2 checkpoint"
  resumed = str(tmp_path / "resumed")
  shutil.copytree(packed_run, resumed)
  ckpts = os.path.join(resumed, "checkpoints")
  for name in os.listdir(ckpts):
    if name != "2":
      shutil.rmtree(os.path.join(ckpts, name))
  os.remove(os.path.join(resumed, "metrics.jsonl"))
  _cli("tregjax.train", *_train_args(world, resumed))
  with open(os.path.join(resumed, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert (summary["start_step"], summary["step"]) == (2, last)
  again = tc.metrics_by_step(resumed)
  assert sorted(again) == list(range(3, last + 1))
  for s in again:
    for k in ("data/fingerprint", "data/loss_weight", "loss/total", "optim/grad_norm"):
      assert again[s][k] == full[s][k], (s, k)


def test_two_processes_train_the_packed_single_process_run(world, packed_run, tmp_path):
  """launch/local_multiprocess.sh -n 2 runs the same CLI: each process packs the same rows and feeds its half of
  every global batch (1 of the 2 rows), in training and in the packed evaluation; tolerances: module docstring."""
  multi = str(tmp_path / "multi")
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "-n", "2", "--",
                         sys.executable, "-m", "tregjax.train", *_train_args(world, multi)],
                        env=tc.worker_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:]
  # Both processes found jax's preemption service (on by default) through its public API.
  assert sum(f"[p{i}] " in l and "preemption handling: jax_service" in l
             for i in range(2) for l in proc.stdout.splitlines()) == 2, proc.stdout[-4000:]
  one, two = tc.metrics_by_step(packed_run), tc.metrics_by_step(multi)
  assert sorted(two) == sorted(one)
  steps = sorted(one)
  assert [two[s]["data/loss_weight"] for s in steps] == [one[s]["data/loss_weight"] for s in steps]
  for k in ("loss/total", "loss/regularizer", "optim/grad_norm"):
    np.testing.assert_allclose([two[s][k] for s in steps], [one[s][k] for s in steps], rtol=1e-5, err_msg=k)
  # β × a difference of ~100-nat float32 sums: a few of their ulps (8e-6 each) apart.
  np.testing.assert_allclose([two[s]["rewards/margin"] for s in steps], [one[s]["rewards/margin"] for s in steps],
                             atol=5e-6)
  evals = []
  for workdir in (packed_run, multi):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      evals.append([r for r in map(json.loads, f) if "eval/loss/total" in r])
  assert len(evals[0]) == len(evals[1]) == 1
  for k in ("eval/loss/total", "eval/loss/regularizer", "eval/logps/chosen"):
    np.testing.assert_allclose(evals[1][0][k], evals[0][0][k], rtol=1e-5, atol=1e-8, err_msg=k)
  import jax  # pylint: disable=g-import-not-at-top
  from tregjax import training  # pylint: disable=g-import-not-at-top
  (a, step_a), (b, step_b) = training.load_model(packed_run), training.load_model(multi)
  assert step_a == step_b == steps[-1]
  from flax import nnx  # pylint: disable=g-import-not-at-top
  leaves_a = jax.tree_util.tree_leaves_with_path(nnx.state(a, nnx.Param))
  leaves_b = dict(jax.tree_util.tree_leaves_with_path(nnx.state(b, nnx.Param)))
  assert len(leaves_a) == len(leaves_b) > 0
  for path, x in leaves_a:
    np.testing.assert_allclose(np.asarray(leaves_b[path]), np.asarray(x), rtol=0, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
