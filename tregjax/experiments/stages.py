"""A workdir of cached stages, and what a task hands the runner: the stage machinery every experiment shares.

A stage writes DONE (its wall time and a hash of the inputs that define it, `stage_key`) when complete; a rerun skips
finished stages, and a stage finished from other inputs is refused rather than silently reused (a stage key gaining a
config key at its default still matches: existing workdirs are reused). A task (`Task`) is registered by
"module:Class" in `tregjax.programs.TASKS`; it builds its reference and pairs (`prepare` -> `Prepared`) here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np

from tregjax import errors, storage
from tregjax.data import hashing
from tregjax.training import config as config_lib


def default_experiment_config() -> ml_collections.ConfigDict:
  """The `experiment` section: which task, which arms, and what else the report measures."""
  return ml_collections.ConfigDict(dict(
      task="synthetic",  # a key of tregjax.programs.TASKS
      arms=("dpo", "dpo_reg"),
      # Policies whose implicit token rewards β·(log π − log π_ref) join the token-credit table ("dpo" is the paper's
      # DPO-implicit source and TGDPO's guidance; any trained arm can be added).
      credit_policies=("dpo",),
      reward_model_steps=0,  # > 0: train a Bradley-Terry reward model on the pairs for R3HF token rewards
      reward_model_lr=1e-5,
      heatmap_rows=10,
  ))


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
          raise errors.StaleCacheError(f"stage {self.path(name)} was made from other inputs ({detail}); delete it or "
                                       f"use another --workdir")
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
    os.makedirs(self.path(name), exist_ok=True)
    storage.write_json(os.path.join(self.path(name), "DONE"), info)
    self.say(f"{name} done in {info['seconds']:.0f}s")
    return info

  def key_json(self, key: Any) -> Any:
    """A stage's inputs as JSON with this workdir's path written as <workdir>: a moved (or linked) workdir keeps its
    stages."""
    return json.loads(json.dumps(key, default=str).replace(self.root, "<workdir>"))

  def key_hash(self, key: Any) -> str:
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
  return _flatten(json.loads(json.dumps(config_lib.base_config().to_dict(), default=str)))


def stage_key(stage: ml_collections.ConfigDict) -> dict[str, Any]:
  """What defines a training stage's result: its whole config but the logging section (progress bars, TensorBoard)."""
  return {k: v for k, v in stage.to_dict().items() if k != "logging"}


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What a task's `prepare` hands the shared stages: a reference model and preference pairs to score and train on."""
  reference: str  # Hugging Face directory of the reference (= every arm's initial policy)
  tokenizer: str  # tokenizer directory (chat template)
  train_pairs: str  # JSONL of {"prompt", "chosen", "rejected"}
  eval_pairs: str = ""  # JSONL for the trainer's held-out preference metrics ("" -> none)
  data: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # data.* overrides (lengths, buckets)


class Task(Protocol):
  """A world or task the runner can run: registered in tregjax.programs.TASKS."""
  name: str
  section: str  # the config section holding the task's own keys (its TaskEntry's in tregjax.programs.TASKS)

  def prepare(self, config: ml_collections.ConfigDict, stages: Stages) -> Prepared: ...

  def token_labels(self, prompt_messages: list[dict[str, str]], response_ids: Sequence[int]) -> np.ndarray:
    """int8 per response token: +1 correct, −1 error, 0 unlabelled (the oracle's token truth)."""

  def evaluate(self, config: ml_collections.ConfigDict, stages: Stages, prepared: Prepared,
               policies: dict[str, str]) -> dict[str, Any]:
    """{"policies": {name: {metric: value}}, "plot": [Estimate...], "plot_title": str, "table": str, ...}"""



def trainer_config(config: ml_collections.ConfigDict, task_section: str) -> ml_collections.ConfigDict:
  """The trainer's part of an experiment config (a fresh, unlocked copy without experiment/task sections): a config of
  the "train" program (the default, so stage keys made before `config.program` existed still match)."""
  d = config.to_dict()
  for section in ("experiment", task_section):
    d.pop(section, None)
  d["program"] = "train"
  return ml_collections.ConfigDict(d)


__all__ = ["Stages", "stage_key", "Prepared", "Task", "default_experiment_config", "trainer_config"]
