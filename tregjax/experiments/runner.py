"""One experiment runner for every world: stages cached in a workdir -> arms -> token credit -> evaluation -> report.

    python -m tregjax.train --config configs/demo.py            (the synthetic world, task "synthetic")
    python -m tregjax.train --config configs/smollm2_arith.py   (SmolLM2-135M-Instruct on arithmetic, task "arith")

A task supplies what differs between worlds: how the reference and the preference pairs come to exist (`prepare`),
the oracle's token truth (`token_labels`, which also gives the oracle arm its rewards), and the policy evaluation
(`evaluate`). Everything else is here and shared:

  scoring    `tregjax.score` once per token-reward source: contrastive (T-REG's prompts), dpo_implicit (from the
             trained DPO arm: the paper's ablation and TGDPO's guidance), oracle (the task's token truth), r3hf (a
             sequence reward model trained on the same pairs by the trainer's `reward_model` objective)
  arms       config overrides of `loss` (+ which scored cache), each trained from the reference on the same pairs, the
             same steps and the same seed (`ARMS`)
  credit     ROC-AUC of every token-reward source at ranking the oracle's correct tokens above its error tokens, on the
             reference's own responses (the training pairs), with a bootstrap interval over responses
  report     results.json, a printed table, a PNG plot and an HTML heatmap of token rewards in the workdir

Each stage writes DONE (with its wall time and a hash of the inputs that define it) when complete; a rerun skips
finished stages (a killed trainer resumes from its checkpoint, the scoring and sampling passes from their work shards),
and a stage finished from other inputs is refused rather than silently reused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np

from tregjax import errors
from tregjax.experiments import stats

log = logging.getLogger("tregjax.experiments")


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
REWARD_SOURCES = ("contrastive", "dpo_implicit", "oracle", "r3hf", "confidence")


def default_experiment_config() -> ml_collections.ConfigDict:
  """The `experiment` section: which task, which arms, and what else the report measures."""
  return ml_collections.ConfigDict(dict(
      task="synthetic",  # "synthetic" (tregjax.synthetic.demo) | "arith" (tregjax.tasks.arith_experiment)
      arms=("dpo", "dpo_reg"),
      # Policies whose implicit token rewards β·(log π − log π_ref) join the token-credit table ("dpo" is the paper's
      # DPO-implicit source and TGDPO's guidance; any trained arm can be added).
      credit_policies=("dpo",),
      reward_model_steps=0,  # > 0: train a Bradley-Terry reward model on the pairs for R3HF token rewards
      reward_model_lr=1e-5,
      heatmap_rows=10,
  ))


def experiment_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.experiment` over the defaults; unknown keys (config_schema.merge: the rule of every section) and arms are
  errors naming the key."""
  from tregjax import config_schema  # pylint: disable=g-import-not-at-top
  merged = config_schema.merge("experiment", default_experiment_config(), config.get("experiment", None))
  unknown = [a for a in merged.arms if a not in ARMS]
  if unknown:
    raise ValueError(f"experiment.arms: unknown {unknown}; choose from {sorted(ARMS)}")
  unknown = [a for a in merged.credit_policies if a not in merged.arms]
  if unknown:
    raise ValueError(f"experiment.credit_policies: {unknown} are not among experiment.arms {tuple(merged.arms)}")
  needs_dpo = [a for a in merged.arms if ARMS[a].rewards == "dpo_implicit"]
  if needs_dpo and "dpo" not in merged.arms:
    raise ValueError(f"experiment.arms: {needs_dpo} train on the DPO arm's implicit token rewards; add 'dpo'")
  return merged


# -------------------------------------------------------------------------------------------------- stages


class Stages:
  """A workdir of stages: `path(name)`, `done(name)`, `finish(name, info)`; wall times kept for the report."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    self.t0 = time.perf_counter()
    os.makedirs(root, exist_ok=True)

  def path(self, name: str) -> str:
    return os.path.join(self.root, name)

  def done(self, name: str, key: Any = None) -> bool:
    """Whether stage `name` finished; with `key` (the inputs that define it, JSON-able), a stage finished from other
    inputs is an error rather than a silent reuse."""
    if not os.path.exists(os.path.join(self.path(name), "DONE")):
      return False
    if key is not None:
      info = self.info(name)
      if info.get("key") != self.key_hash(key):
        differences = self._differences(info.get("key_json"), key)
        if differences is None or differences:
          detail = "; ".join(differences[:5]) if differences else "another config"
          raise errors.StaleCacheError(f"stage {self.path(name)} was made from other inputs ({detail}); delete it or use "
                                f"another --workdir")
    return True

  def _differences(self, stored: dict | None, key: Any) -> list[str] | None:
    """What differs between a stage's stored key and `key` ("path: old -> new"), ignoring config keys added since the
    stage was made that still hold their default (the stage was made with that default); None if nothing is stored."""
    if stored is None:
      return None
    old, new = _flatten(stored), _flatten(self.key_json(key))
    defaults = _config_defaults()
    out = []
    for path in sorted(set(old) | set(new)):
      if old.get(path, _MISSING) == new.get(path, _MISSING):
        continue
      if path not in old and _default_of(path, defaults) == new[path]:
        continue  # a key added since, at its default
      out.append(f"{path}: {old.get(path, '(absent)')!r} -> {new.get(path, '(absent)')!r}")
    return out

  def info(self, name: str) -> dict:
    with open(os.path.join(self.path(name), "DONE"), encoding="utf-8") as f:
      return json.load(f)

  def finish(self, name: str, started: float, info: dict | None = None, key: Any = None) -> dict:
    info = dict(info or {}, seconds=round(time.perf_counter() - started, 1))
    if key is not None:
      info["key"], info["key_json"] = self.key_hash(key), self.key_json(key)
    from tregjax.data import hashing  # pylint: disable=g-import-not-at-top
    os.makedirs(self.path(name), exist_ok=True)
    hashing.atomic_write_json(os.path.join(self.path(name), "DONE"), info)
    self.say(f"{name} done in {info['seconds']:.0f}s")
    return info

  def key_json(self, key: Any) -> Any:
    """A stage's inputs as JSON with this workdir's path written as <workdir>: a moved (or linked) workdir keeps its
    stages."""
    return json.loads(json.dumps(key, default=str).replace(self.root, "<workdir>"))

  def key_hash(self, key: Any) -> str:
    from tregjax.data import hashing  # pylint: disable=g-import-not-at-top
    return hashing.hash_json(self.key_json(key))

  def say(self, message: str) -> None:
    print(f"[experiment {time.perf_counter() - self.t0:6.0f}s] {message}", flush=True)

  def seconds(self) -> dict[str, float]:
    """Wall time of every finished stage (as measured when it ran, even if this run reused it)."""
    out = {}
    for dirpath, _, files in os.walk(self.root):
      if "DONE" in files:
        with open(os.path.join(dirpath, "DONE"), encoding="utf-8") as f:
          out[os.path.relpath(dirpath, self.root)] = json.load(f).get("seconds", float("nan"))
    return dict(sorted(out.items()))


_MISSING = object()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out: dict[str, Any] = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _default_of(path: str, defaults: dict[str, Any]) -> Any:
  """The default of a config key, also where a stage key nests the config ("trainer.loss.alpha" -> "loss.alpha")."""
  parts = path.split(".")
  for i in range(len(parts)):
    if ".".join(parts[i:]) in defaults:
      return defaults[".".join(parts[i:])]
  return _MISSING


def _config_defaults() -> dict[str, Any]:
  """Every trainer config key's default, flattened ("loss.alpha": 0.25), as JSON values."""
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  return _flatten(json.loads(json.dumps(config_lib.base_config().to_dict(), default=str)))


def stage_key(stage: ml_collections.ConfigDict) -> dict[str, Any]:
  """What defines a training stage's result: its whole config but the logging section (progress bars, TensorBoard)."""
  return {k: v for k, v in stage.to_dict().items() if k != "logging"}


# ---------------------------------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What a task's `prepare` hands the shared stages: a reference model and preference pairs to score and train on."""
  reference: str  # Hugging Face directory of the reference (= every arm's initial policy)
  tokenizer: str  # tokenizer directory (chat template)
  train_pairs: str  # JSONL of {"prompt", "chosen", "rejected"}
  eval_pairs: str = ""  # JSONL for the trainer's held-out preference metrics ("" -> none)
  data: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # data.* overrides (lengths, buckets)


class Task(Protocol):
  """A world or task the runner can run: see tregjax/synthetic/demo.py and tregjax/tasks/arith_experiment.py."""
  name: str
  section: str  # the config section holding the task's own keys (e.g. "demo", "arith")

  def prepare(self, config: ml_collections.ConfigDict, stages: Stages) -> Prepared: ...

  def token_labels(self, prompt_messages: list[dict[str, str]], response_ids: Sequence[int]) -> np.ndarray:
    """int8 per response token: +1 correct, −1 error, 0 unlabelled (the oracle's token truth)."""

  def evaluate(self, config: ml_collections.ConfigDict, stages: Stages, prepared: Prepared,
               policies: dict[str, str]) -> dict[str, Any]:
    """{"policies": {name: {metric: value}}, "plot": [Estimate...], "plot_title": str, "table": str, ...}"""


def oracle_rewards(task: Task) -> Callable[[list[dict[str, str]], list[int]], np.ndarray]:
  """The token-reward oracle of the scoring pass: the task's token truth on T-REG's scale (+0.5 / −0.5 / 0)."""

  def oracle(prompt_messages, response_ids):
    return 0.5 * np.asarray(task.token_labels(prompt_messages, response_ids), np.float32)

  return oracle


# ------------------------------------------------------------------------------------------ shared stages


def trainer_config(config: ml_collections.ConfigDict, task_section: str) -> ml_collections.ConfigDict:
  """The trainer's part of an experiment config (a fresh, unlocked copy without experiment/task sections): a config of
  the "train" program (the default, so stage keys made before `config.program` existed still match)."""
  d = config.to_dict()
  for section in ("experiment", task_section):
    d.pop(section, None)
  d["program"] = "train"
  return ml_collections.ConfigDict(d)


def _with_data(stage: ml_collections.ConfigDict, prepared: Prepared, stages: Stages) -> ml_collections.ConfigDict:
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


def _reward_settings(source: str, stages: Stages, task: Task) -> dict[str, Any]:
  """score.token_reward keys of each source's cache (the trainer recomputes the cache hash from the same keys)."""
  if source == "dpo_implicit":
    return dict(source="dpo_implicit", dpo_checkpoint=stages.path("arms/dpo/hf"))
  if source == "r3hf":
    return dict(source="r3hf", reward_model=stages.path("reward_model/hf"))
  if source == "oracle":
    return dict(source="oracle", oracle="", oracle_id=f"{task.name}:token_labels")
  if source == "confidence":
    return dict(source="confidence")
  if source.startswith("implicit:"):
    return dict(source="dpo_implicit", dpo_checkpoint=stages.path(f"arms/{source.split(':', 1)[1]}/hf"))
  return dict(source="contrastive")


def score_stage(config, task: Task, prepared: Prepared, stages: Stages, source: str) -> str:
  """The scored cache of one token-reward source (reference log-probs are the same in every one)."""
  from tregjax import score  # pylint: disable=g-import-not-at-top
  name = "scored/" + source.replace(":", "_")
  cache = os.path.join(stages.path(name), "cache")
  started = time.perf_counter()
  stage = _with_data(trainer_config(config, task.section), prepared, stages)
  stage.data.cache_dir = cache
  stage.score.token_reward.update(_reward_settings(source, stages, task))
  # Always called: a finished, current cache returns at once; one of other inputs is refused (StaleCacheError).
  score.run(stage, oracle=oracle_rewards(task) if source == "oracle" else None)
  if not stages.done(name):
    stages.finish(name, started)
  return cache


def _export(model, out: str, tokenizer_dir: str) -> str:
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  from tregjax import models  # pylint: disable=g-import-not-at-top
  models.save_pretrained(model, out, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
  return out


def _exit_if_preempted(summary: Any, stages: Stages, name: str) -> None:
  """A SIGTERM mid-training saved a checkpoint: stop the whole experiment (exit 0, as the trainer does) instead of
  marking a half-trained stage done and evaluating it; a rerun resumes the stage from its checkpoint."""
  if summary.stopped == "preempted":
    stages.say(f"{name} preempted at step {summary.step}; rerun the same command to resume")
    raise SystemExit(0)


def train_arm(config, task: Task, prepared: Prepared, stages: Stages, arm: str) -> dict[str, Any]:
  """One arm from the reference on its scored cache; exported to arms/<arm>/hf. Returns the trainer's summary."""
  from tregjax.training import trainer  # pylint: disable=g-import-not-at-top
  name = f"arms/{arm}"
  started = time.perf_counter()
  stage = _with_data(trainer_config(config, task.section), prepared, stages)
  stage.objective = "preference"
  stage.data.cache_dir = os.path.join(stages.path("scored/" + ARMS[arm].rewards), "cache")
  stage.score.token_reward.update(_reward_settings(ARMS[arm].rewards, stages, task))
  stage.loss.update(dict(ARMS[arm].loss))
  key = stage_key(stage)
  if stages.done(name, key):
    return stages.info(name)
  score_stage(config, task, prepared, stages, ARMS[arm].rewards)
  summary = trainer.run(stage, os.path.join(stages.path(name), "run"))
  _exit_if_preempted(summary, stages, name)
  _export(summary.model(), os.path.join(stages.path(name), "hf"), prepared.tokenizer)
  return stages.finish(name, started, {k: getattr(summary, k) for k in ("final_metrics", "eval_metrics", "step")},
                       key=key)


def train_reward_model(config, task: Task, prepared: Prepared, stages: Stages, exp) -> str:
  """A Bradley-Terry sequence reward model on the same pairs, from the reference (fresh head): R3HF's scorer."""
  from tregjax import data  # pylint: disable=g-import-not-at-top
  from tregjax.training import trainer  # pylint: disable=g-import-not-at-top
  name = "reward_model"
  hf = os.path.join(stages.path(name), "hf")
  started = time.perf_counter()
  stage = _with_data(trainer_config(config, task.section), prepared, stages)
  stage.objective = "reward_model"
  stage.train.steps = int(exp.reward_model_steps)
  stage.optimizer.lr = float(exp.reward_model_lr)
  key = stage_key(stage)
  if stages.done(name, key):
    return hf
  data.build_dataset(stage)
  summary = trainer.run(stage, os.path.join(stages.path(name), "run"))
  _exit_if_preempted(summary, stages, name)
  _export(summary.model(), hf, prepared.tokenizer)
  stages.finish(name, started, {"final_metrics": summary.final_metrics}, key=key)
  return hf


# ------------------------------------------------------------------------------------------ token credit


def _cache_rows(cache: str) -> list[dict[str, Any]]:
  from tregjax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  with open(os.path.join(cache, "cache_meta.json"), encoding="utf-8") as f:
    dataset = os.path.join(cache, json.load(f)["dataset"])
  src = tfds_builder.data_source(dataset, "train")
  return [src[i] for i in range(len(src))]


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def token_truth(task: Task, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
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
  from tregjax import losses  # pylint: disable=g-import-not-at-top
  rewards = [np.asarray(row[f"{side}_token_rewards"], np.float32) for row in rows for side in ("chosen", "rejected")]
  width = max(len(r) for r in rewards)
  padded, mask = np.zeros((len(rewards), width), np.float32), np.zeros((len(rewards), width), bool)
  for i, r in enumerate(rewards):
    padded[i, :len(r)], mask[i, :len(r)] = r, True
  weights = np.asarray(losses.tisdpo_token_weights(padded, mask, chosen=True))
  return np.concatenate([weights[i, :len(r)] for i, r in enumerate(rewards)])


def token_credit(task: Task, caches: dict[str, str], seed: int) -> tuple[dict[str, dict], dict[str, np.ndarray],
                                                                          list[dict[str, Any]]]:
  """AUC (with a bootstrap interval over responses) of every scored token-reward source against the oracle's truth,
  on the reference's own responses; plus chance (uniform random scores) as the floor."""
  rows = _cache_rows(caches["contrastive"])
  truth = token_truth(task, rows)
  out = {}
  for source, cache in caches.items():
    source_rows = rows if source == "contrastive" else _cache_rows(cache)
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
  from tregjax.experiments import report  # pylint: disable=g-import-not-at-top
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

  from tregjax.experiments import report  # pylint: disable=g-import-not-at-top
  exp = experiment_section(config)
  task = make_task(exp.task, config)
  stages = Stages(workdir)
  prepared = task.prepare(config, stages)
  caches = {"contrastive": score_stage(config, task, prepared, stages, "contrastive")}
  stages.say(f"contrastive token rewards scored ({caches['contrastive']})")
  arms = sorted(exp.arms, key=lambda a: (ARMS[a].rewards == "dpo_implicit", list(exp.arms).index(a)))
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
  out = dict(task=task.name, arms={a: dict(label=ARMS[a].label, **summaries[a]) for a in exp.arms},
             policies=evaluation["policies"], comparisons=evaluation.get("comparisons", {}), token_credit=credit,
             seconds=seconds, total_seconds=round(time.perf_counter() - stages.t0, 1),
             artifacts=dict(plot=plot, heatmap=heatmap), notes=evaluation.get("notes", []))
  from tregjax.data import hashing  # pylint: disable=g-import-not-at-top
  hashing.atomic_write_json(os.path.join(workdir, "results.json"), out)
  print("\n" + table, flush=True)
  for line in evaluation.get("notes", []):
    print(line, flush=True)
  print("\nstage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), flush=True)
  print(f"results: {os.path.join(workdir, 'results.json')}, plot: {plot}, heatmap: {heatmap}", flush=True)
  return out


def make_task(name: str, config: ml_collections.ConfigDict) -> Task:
  """The task object of `experiment.task`."""
  if name == "synthetic":
    from tregjax.synthetic import demo  # pylint: disable=g-import-not-at-top
    return demo.SyntheticTask(config)
  if name == "arith":
    from tregjax.tasks import arith_experiment  # pylint: disable=g-import-not-at-top
    return arith_experiment.ArithTask(config)
  raise ValueError(f"experiment.task={name!r}: choose 'synthetic' or 'arith'")
