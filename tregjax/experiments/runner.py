"""One experiment runner for every world: stages cached in a workdir -> arms -> token credit -> evaluation -> report.

    python -m tregjax.train --config CONFIG   (a config whose program is "experiment"; its experiment.task is a key of
                                               tregjax.programs.TASKS, which names each task's class and section)

A task (`stages.Task`, imported by name only when chosen: this module imports none) supplies what differs between worlds: how the reference and the preference pairs come to exist (`prepare`),
the oracle's token truth (`token_labels`, which also gives the oracle arm its rewards), and the policy evaluation
(`evaluate`). Everything else is here and shared:

  scoring    `tregjax.score` once per token-reward source: contrastive (T-REG's prompts), dpo_implicit (from the
             trained DPO arm: the paper's ablation and TGDPO's guidance), oracle (the task's token truth), r3hf (a
             sequence reward model trained on the same pairs by the trainer's `reward_model` objective)
  arms       config overrides of `loss` (+ which scored cache), each trained from the reference on the same pairs, the
             same steps and the same seed (`arms_lib.ARMS`)
  credit     ROC-AUC of every token-reward source at ranking the oracle's correct tokens above its error tokens, on the
             reference's own responses (the training pairs), with a bootstrap interval over responses
  report     results.json, a printed table, a PNG plot and an HTML heatmap of token rewards in the workdir

Each stage writes DONE (with its wall time and a hash of the inputs that define it) when complete; a rerun skips
finished stages (a killed trainer resumes from its checkpoint, the scoring and sampling passes from their work shards),
and a stage finished from other inputs is refused rather than silently reused.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from tregjax import config_schema, data, losses, models, programs, score, storage
from tregjax.data import tfds_builder
from tregjax.experiments import arms as arms_lib
from tregjax.experiments import report, stats
from tregjax.experiments import stages as stages_lib
from tregjax.training import trainer

log = logging.getLogger("tregjax.experiments")


def experiment_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.experiment` over the defaults; unknown keys (config_schema.merge: the rule of every section) and arms are
  errors naming the key."""
  merged = config_schema.merge("experiment", stages_lib.default_experiment_config(), config.get("experiment", None))
  unknown = [a for a in merged.arms if a not in arms_lib.ARMS]
  if unknown:
    raise ValueError(f"experiment.arms: unknown {unknown}; choose from {sorted(arms_lib.ARMS)}")
  unknown = [a for a in merged.credit_policies if a not in merged.arms]
  if unknown:
    raise ValueError(f"experiment.credit_policies: {unknown} are not among experiment.arms {tuple(merged.arms)}")
  if merged.task not in programs.TASKS:
    raise ValueError(f"experiment.task={merged.task!r}: choose from {sorted(programs.TASKS)}")
  needs_dpo = [a for a in merged.arms if arms_lib.ARMS[a].rewards == "dpo_implicit"]
  if needs_dpo and "dpo" not in merged.arms:
    raise ValueError(f"experiment.arms: {needs_dpo} train on the DPO arm's implicit token rewards; add 'dpo'")
  return merged


# ---------------------------------------------------------------------------------------------------- tasks


def oracle_rewards(task: stages_lib.Task) -> Callable[[list[dict[str, str]], list[int]], np.ndarray]:
  """The token-reward oracle of the scoring pass: the task's token truth on T-REG's scale (+0.5 / −0.5 / 0)."""

  def oracle(prompt_messages, response_ids):
    return 0.5 * np.asarray(task.token_labels(prompt_messages, response_ids), np.float32)

  return oracle


# ------------------------------------------------------------------------------------------ shared stages


def _with_data(stage: ml_collections.ConfigDict, prepared: stages_lib.Prepared, stages: stages_lib.Stages
               ) -> ml_collections.ConfigDict:
  stage.data.train_files = [prepared.train_pairs]
  stage.data.validation_files = [prepared.eval_pairs] if prepared.eval_pairs else []
  stage.data.schema = "pair"
  stage.data.tokenizer = prepared.tokenizer
  stage.data.dataset_dir = stages.path("dataset")
  for key, value in prepared.data.items():
    stage.data[key] = value
  stage.model.hf_path = prepared.reference
  stage.model.overrides = ml_collections.ConfigDict()  # the architecture comes from the reference's config.json
  if not prepared.eval_pairs:
    stage.data.eval_split = ""
  return stage


def _reward_settings(source: str, stages: stages_lib.Stages, task: stages_lib.Task) -> dict[str, Any]:
  """score.token_reward keys of each source's cache (the trainer recomputes the cache hash from the same keys)."""
  if source == "dpo_implicit":
    return dict(source="dpo_implicit", dpo_checkpoint=stages.path("arms/dpo/hf"))
  if source == "r3hf":
    return dict(source="r3hf", reward_model=stages.path("reward_model/hf"))
  if source == "oracle":
    # A task whose labels changed names them anew (its `oracle_id`), so old scored caches and arms are refused.
    return dict(source="oracle", oracle="", oracle_id=getattr(task, "oracle_id", "") or f"{task.name}:token_labels")
  if source == "confidence":
    return dict(source="confidence")
  if source.startswith("implicit:"):
    return dict(source="dpo_implicit", dpo_checkpoint=stages.path(f"arms/{source.split(':', 1)[1]}/hf"))
  return dict(source="contrastive")


def score_stage(config, task: stages_lib.Task, prepared: stages_lib.Prepared, stages: stages_lib.Stages,
                source: str) -> str:
  """The scored cache of one token-reward source (reference log-probs are the same in every one)."""
  name = "scored/" + source.replace(":", "_")
  cache = os.path.join(stages.path(name), "cache")
  started = time.perf_counter()
  stage = _with_data(stages_lib.trainer_config(config, task.section), prepared, stages)
  stage.data.cache_dir = cache
  stage.score.token_reward.update(_reward_settings(source, stages, task))
  # Always called: a finished, current cache returns at once; one of other inputs is refused (StaleCacheError).
  score.run(stage, oracle=oracle_rewards(task) if source == "oracle" else None)
  if not stages.done(name):
    stages.finish(name, started)
  return cache


def _export(model, out: str, tokenizer_dir: str) -> str:
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  models.save_pretrained(model, out, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
  return out


def exit_if_preempted(summary: Any, stages: stages_lib.Stages, name: str) -> None:
  """A SIGTERM mid-training saved a checkpoint: stop the whole experiment (exit 0, as the trainer does) instead of
  marking a half-trained stage done and evaluating it; a rerun resumes the stage from its checkpoint."""
  if summary.stopped == "preempted":
    stages.say(f"{name} preempted at step {summary.step}; rerun the same command to resume")
    raise SystemExit(0)


def arm_stage(config, task: stages_lib.Task, prepared: stages_lib.Prepared, stages: stages_lib.Stages,
              arm: str) -> ml_collections.ConfigDict:
  """The trainer config of arm `arm`: the reference on the pairs, its loss, its token-reward source's scored cache."""
  stage = _with_data(stages_lib.trainer_config(config, task.section), prepared, stages)
  stage.objective = "preference"
  stage.data.cache_dir = os.path.join(stages.path("scored/" + arms_lib.ARMS[arm].rewards), "cache")
  stage.score.token_reward.update(_reward_settings(arms_lib.ARMS[arm].rewards, stages, task))
  stage.loss.update(dict(arms_lib.ARMS[arm].loss))
  return stage


def reward_model_stage(config, task: stages_lib.Task, prepared: stages_lib.Prepared, stages: stages_lib.Stages,
                       exp: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The trainer config of the R3HF reward model: a Bradley-Terry head on the reference, on the same pairs."""
  stage = _with_data(stages_lib.trainer_config(config, task.section), prepared, stages)
  stage.objective = "reward_model"
  stage.train.steps = int(exp.reward_model_steps)
  stage.optimizer.lr = float(exp.reward_model_lr)
  return stage


def train_arm(config, task: stages_lib.Task, prepared: stages_lib.Prepared, stages: stages_lib.Stages,
              arm: str) -> dict[str, Any]:
  """One arm from the reference on its scored cache; exported to arms/<arm>/hf. Returns the trainer's summary."""
  name = f"arms/{arm}"
  started = time.perf_counter()
  stage = arm_stage(config, task, prepared, stages, arm)
  key = stages_lib.stage_key(stage)
  if stages.done(name, key):
    return stages.info(name)
  score_stage(config, task, prepared, stages, arms_lib.ARMS[arm].rewards)
  summary = trainer.run(stage, os.path.join(stages.path(name), "run"))
  exit_if_preempted(summary, stages, name)
  _export(summary.model(), os.path.join(stages.path(name), "hf"), prepared.tokenizer)
  return stages.finish(name, started, {k: getattr(summary, k) for k in ("final_metrics", "eval_metrics", "step")},
                       key=key)


def train_reward_model(config, task: stages_lib.Task, prepared: stages_lib.Prepared, stages: stages_lib.Stages,
                       exp: ml_collections.ConfigDict) -> str:
  """A Bradley-Terry sequence reward model on the same pairs, from the reference (fresh head): R3HF's scorer."""
  name = "reward_model"
  hf = os.path.join(stages.path(name), "hf")
  started = time.perf_counter()
  stage = reward_model_stage(config, task, prepared, stages, exp)
  key = stages_lib.stage_key(stage)
  if stages.done(name, key):
    return hf
  data.build_dataset(stage)
  summary = trainer.run(stage, os.path.join(stages.path(name), "run"))
  exit_if_preempted(summary, stages, name)
  _export(summary.model(), hf, prepared.tokenizer)
  stages.finish(name, started, {"final_metrics": summary.final_metrics}, key=key)
  return hf


# ------------------------------------------------------------------------------------------ token credit


def cache_rows(cache: str) -> list[dict[str, Any]]:
  """The rows of a scored cache directory (its cache_meta.json names the dataset), as dicts."""
  with open(os.path.join(cache, "cache_meta.json"), encoding="utf-8") as f:
    dataset = os.path.join(cache, json.load(f)["dataset"])
  src = tfds_builder.data_source(dataset, "train")
  return [src[i] for i in range(len(src))]


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def token_truth(task: stages_lib.Task, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Flattened over every response (chosen and rejected of each pair): ids, oracle labels, response (group) ids."""
  ids, labels, groups = [], [], []
  for i, row in enumerate(rows):
    messages = json.loads(_text(row["prompt_messages"]))
    for k, side in enumerate(("chosen", "rejected")):
      side_ids = [int(x) for x in row[f"{side}_ids"]]
      ids.append(np.asarray(side_ids))
      labels.append(np.asarray(task.token_labels(messages, side_ids), np.int8))
      groups.append(np.full(len(side_ids), 2 * i + k))
  return dict(ids=np.concatenate(ids), labels=np.concatenate(labels), groups=np.concatenate(groups))


def flat_rewards(rows: list[dict[str, Any]]) -> np.ndarray:
  return np.concatenate([np.asarray(row[f"{side}_token_rewards"], np.float32)
                         for row in rows for side in ("chosen", "rejected")])


def _credit_row(scores: np.ndarray, truth: dict[str, np.ndarray], seed: int, means: bool = True) -> dict[str, Any]:
  """AUC of `scores` at ranking the oracle's correct tokens above its error tokens, its bootstrap interval over
  responses, and the scores' means on each class."""
  labels = truth["labels"]
  auc, low, high = stats.auc_interval(scores, labels, truth["groups"], seed=seed)
  mean = lambda m: float(scores[m].mean()) if (means and m.any()) else None  # noqa: E731
  return dict(auc=auc, low=low, high=high, mean_correct=mean(labels > 0), mean_error=mean(labels < 0))


def tisdpo_weights(rows: list[dict[str, Any]]) -> np.ndarray:
  """TIS-DPO's chosen-side importance weight of every response token (from the contrastive rewards), flattened like
  `flat_rewards`: how much weight TIS-DPO would give each token if it were in a chosen response."""
  rewards = [np.asarray(row[f"{side}_token_rewards"], np.float32) for row in rows for side in ("chosen", "rejected")]
  width = max(len(r) for r in rewards)
  padded, mask = np.zeros((len(rewards), width), np.float32), np.zeros((len(rewards), width), bool)
  for i, r in enumerate(rewards):
    padded[i, :len(r)], mask[i, :len(r)] = r, True
  weights = np.asarray(losses.tisdpo_token_weights(padded, mask, chosen=True))
  return np.concatenate([weights[i, :len(r)] for i, r in enumerate(rewards)])


def token_credit(task: stages_lib.Task, caches: dict[str, str], seed: int
                 ) -> tuple[dict[str, dict], dict[str, np.ndarray], list[dict[str, Any]]]:
  """AUC (with a bootstrap interval over responses) of every scored token-reward source against the oracle's truth,
  on the reference's own responses; plus chance (uniform random scores) as the floor."""
  rows = cache_rows(caches["contrastive"])
  truth = token_truth(task, rows)
  out = {}
  for source, cache in caches.items():
    source_rows = rows if source == "contrastive" else cache_rows(cache)
    if [r["chosen_ids"].tolist() for r in source_rows] != [r["chosen_ids"].tolist() for r in rows]:
      raise RuntimeError(f"scored cache {cache} holds other responses than the contrastive cache")
    out[source] = _credit_row(flat_rewards(source_rows), truth, seed)
  # TIS-DPO's weights are a per-response normalised transform of the contrastive differences: the same signal, but
  # the normalisation can reorder tokens across responses.
  out["tisdpo_weight"] = _credit_row(tisdpo_weights(rows), truth, seed)
  # The reference's raw log π_ref(y_t) (in every cache, free; the "confidence" source centres it per response):
  # the floor any prompting trick must beat to be worth its two extra forward passes.
  out["ref_logprob"] = _credit_row(np.concatenate([np.asarray(row[f"ref_{side}_token_logps"], np.float32)
                                                   for row in rows for side in ("chosen", "rejected")]), truth, seed)
  out["chance"] = _credit_row(np.random.default_rng(seed).random(truth["labels"].shape), truth, seed, means=False)
  counts = dict(error_tokens=int((truth["labels"] < 0).sum()), correct_tokens=int((truth["labels"] > 0).sum()),
                responses=int(len(rows) * 2))
  return dict(sources=out, counts=counts), truth, rows


CREDIT_LABELS = {
    "contrastive": "contrastive prompting (T-REG)",
    "dpo_implicit": "DPO-implicit after DPO (= TGDPO's guidance)",
    "r3hf": "R3HF (sequence RM redistributed)",
    "oracle": "oracle token truth (sanity: 1.0)",
    "confidence": "reference confidence (ConfPO-style, no prompt)",
    "ref_logprob": "raw log π_ref(y_t), uncentred (no prompt)",
    "tisdpo_weight": "TIS-DPO weight w_t (from the contrastive δ_t)",
    "chance": "chance (random scores)",
}


def credit_label(source: str) -> str:
  if source.startswith("implicit:"):
    return f"implicit reward of {source.split(':', 1)[1]}"
  return CREDIT_LABELS.get(source, source)


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
  """Each token's text as it appears in the decoded response (incremental decoding keeps the spaces a decoder puts
  between word-level tokens, which decoding one id at a time drops)."""
  out, previous = [], ""
  for k in range(len(ids)):
    text = tokenizer.decode([int(i) for i in ids[:k + 1]], clean_up_tokenization_spaces=False)
    out.append(text[len(previous):] if text.startswith(previous) else tokenizer.decode([int(ids[k])]))
    previous = text
  return out


def heatmap_rows(task_tokenizer, rows: list[dict[str, Any]], truth: dict[str, np.ndarray], rewards: np.ndarray,
                 count: int) -> list[Any]:
  """About `count` responses for the heatmap: those with the most oracle-labelled error tokens first, then others."""
  groups = truth["groups"]
  starts = np.concatenate([[0], np.flatnonzero(np.diff(groups)) + 1, [len(groups)]])
  spans = [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
  errors = [int((truth["labels"][a:b] < 0).sum()) for a, b in spans]
  order = sorted(range(len(spans)), key=lambda g: (-min(errors[g], 3), g))[:count]
  out = []
  for g in sorted(order):
    a, b = spans[g]
    side = ("chosen", "rejected")[g % 2]
    question = json.loads(_text(rows[g // 2]["prompt_messages"]))[-1]["content"]
    tokens = token_strings(task_tokenizer, truth["ids"][a:b])
    out.append(report.TokenRow(title=f"pair {g // 2} · {side} · {errors[g]} error tokens · {question[:100]}",
                               tokens=tokens, rewards=rewards[a:b].tolist(), labels=truth["labels"][a:b].tolist()))
  return out


# ------------------------------------------------------------------------------------------------- report


def fmt(value: Any, spec: str) -> str:
  if value is None or (isinstance(value, float) and np.isnan(value)):
    return "n/a"
  return format(value, spec)


def credit_table(credit: dict) -> str:
  lines = [f"{'token-reward source':<46} {'AUC':>6} {'95% interval':>16} {'mean on correct':>15} "
           f"{'mean on errors':>14}"]
  for source, r in credit["sources"].items():
    lines.append(f"{credit_label(source):<46} {fmt(r['auc'], '.3f'):>6} "
                 f"{'[' + fmt(r['low'], '.3f') + ', ' + fmt(r['high'], '.3f') + ']':>16} "
                 f"{fmt(r['mean_correct'], '+.3f'):>15} {fmt(r['mean_error'], '+.3f'):>14}")
  c = credit["counts"]
  lines.append(f"(on {c['responses']} responses of the reference: {c['correct_tokens']} correct and "
               f"{c['error_tokens']} error tokens by the oracle; intervals: bootstrap over responses)")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The whole experiment; returns and writes workdir/results.json (plus plot.png and heatmap.html)."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  exp = experiment_section(config)
  task = make_task(exp.task, config)
  stages = stages_lib.Stages(workdir)
  prepared = task.prepare(config, stages)
  caches = {"contrastive": score_stage(config, task, prepared, stages, "contrastive")}
  stages.say(f"contrastive token rewards scored ({caches['contrastive']})")
  arms = sorted(exp.arms, key=lambda a: (arms_lib.ARMS[a].rewards == "dpo_implicit", list(exp.arms).index(a)))
  summaries = {}
  for arm in arms:
    summaries[arm] = train_arm(config, task, prepared, stages, arm)
    stages.say(f"arm {arm} trained: step {summaries[arm]['step']}")
  if "dpo" in exp.arms:
    caches["dpo_implicit"] = score_stage(config, task, prepared, stages, "dpo_implicit")
  for policy in exp.credit_policies:
    if policy != "dpo":
      caches[f"implicit:{policy}"] = score_stage(config, task, prepared, stages, f"implicit:{policy}")
  if exp.reward_model_steps > 0:
    train_reward_model(config, task, prepared, stages, exp)
    caches["r3hf"] = score_stage(config, task, prepared, stages, "r3hf")
  caches["confidence"] = score_stage(config, task, prepared, stages, "confidence")
  caches["oracle"] = score_stage(config, task, prepared, stages, "oracle")
  credit, truth, rows = token_credit(task, caches, seed=int(config.seed))

  policies = {"reference": prepared.reference}
  policies.update({arm: os.path.join(stages.path(f"arms/{arm}"), "hf") for arm in exp.arms})
  evaluation = task.evaluate(config, stages, prepared, policies)

  tok = AutoTokenizer.from_pretrained(prepared.tokenizer, local_files_only=True)
  heatmap = report.heatmap(
      os.path.join(workdir, "heatmap.html"),
      heatmap_rows(tok, rows, truth, flat_rewards(rows), int(exp.heatmap_rows)),
      title=f"{task.name}: the reference's contrastive token rewards r̂_t on its own responses",
      caption="r̂_t = σ(log π_ref(y_t | x_better, y<t) − log π_ref(y_t | x_worse, y<t)) − 0.5, the reference's "
              "own token reward under T-REG's two contrastive prompts, on responses it sampled itself.")
  auc_estimates = [report.Estimate(credit_label(s), r["auc"], r["low"], r["high"])
                   for s, r in credit["sources"].items()]
  plot = report.plot(os.path.join(workdir, "plot.png"),
                     [(evaluation["plot_title"], evaluation["plot"]), ("token-credit ROC-AUC", auc_estimates)],
                     title=f"{task.name}: policies and token-reward sources (95% intervals)",
                     reference_lines=(evaluation.get("plot_reference"), 0.5))
  table = evaluation["table"] + "\n\n" + credit_table(credit)
  seconds = stages.seconds()
  out = dict(task=task.name, arms={a: dict(label=arms_lib.ARMS[a].label, **summaries[a]) for a in exp.arms},
             policies=evaluation["policies"], comparisons=evaluation.get("comparisons", {}), token_credit=credit,
             seconds=seconds, total_seconds=round(time.perf_counter() - stages.t0, 1),
             artifacts=dict(plot=plot, heatmap=heatmap), notes=evaluation.get("notes", []))
  storage.write_json(os.path.join(workdir, "results.json"), out)
  print("\n" + table, flush=True)
  for line in evaluation.get("notes", []):
    print(line, flush=True)
  print("\nstage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), flush=True)
  print(f"results: {os.path.join(workdir, 'results.json')}, plot: {plot}, heatmap: {heatmap}", flush=True)
  return out


def make_task(name: str, config: ml_collections.ConfigDict) -> stages_lib.Task:
  """The task object of `experiment.task` (its class named in tregjax.programs.TASKS, imported only now)."""
  return programs.load(programs.TASKS[name].cls, "experiment.task")(config)
