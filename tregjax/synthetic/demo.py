"""The embedded default: the synthetic world as a task of the experiment runner (tregjax.experiments.runner).

Every stage is the project's real machinery (tokenizer + chat template, TFDS dataset, the scoring pass with contrastive
prompts, the trainer with Orbax checkpoints); only the data are synthetic. This module supplies what is particular to
the world: writing it and SFT-training a reference that reacts to the `careful`/`sloppy` system prompts (`prepare`),
the oracle's token truth (`token_labels`), and the oracle metrics of each policy (`evaluate`). The runner does the
rest: scoring for every token-reward source, the arms, the token-credit AUC table, the report.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tregjax import config_schema, data, losses, models
from tregjax.data.tokenize import ChatTokenizer, with_instruction
from tregjax.experiments import arms, report, runner, stats
from tregjax.experiments import stages as stages_lib
from tregjax.models import decoding
from tregjax.synthetic import world as world_lib
from tregjax.training import trainer

log = logging.getLogger("tregjax.demo")


def write_world(demo: ml_collections.ConfigDict, out: str) -> dict[str, str]:
  """Tokenizer + JSONL files of the world (SFT demonstrations, train / eval preference pairs)."""
  world = world_lib.World(demo.num_symbols, demo.response_length, demo.world_seed)
  paths = dict(tokenizer=os.path.join(out, "tokenizer"), sft=os.path.join(out, "sft.jsonl"),
               train=os.path.join(out, "pairs_train.jsonl"), eval=os.path.join(out, "pairs_eval.jsonl"))
  os.makedirs(out, exist_ok=True)
  world_lib.write_tokenizer(world, paths["tokenizer"])
  rng = np.random.default_rng(demo.world_seed + 1)
  sft = []
  for record in world_lib.sft_records(world, demo.sft_examples, demo.max_plain_error, seed=demo.world_seed + 2):
    # The trainer's SFT objective learns the chosen side; the rejected side (a sloppier walk) is only there so the
    # record fits the pair schema and can also train a reward model.
    task, start = record["prompt"][-1]["content"].split()
    rejected = world_lib.response_text(world.corrupt(task, int(start), 0.9, rng))
    if rejected == record["response"]:
      continue
    sft.append({"prompt": record["prompt"], "chosen": record["response"], "rejected": rejected})
  world_lib.write_jsonl(sft, paths["sft"])
  world_lib.write_jsonl(world_lib.preference_records(world, demo.train_pairs, demo.max_plain_error,
                                                     seed=demo.world_seed + 3), paths["train"])
  world_lib.write_jsonl(world_lib.preference_records(world, demo.eval_pairs, demo.max_plain_error,
                                                     seed=demo.world_seed + 4), paths["eval"])
  return paths


def _data_config(stage: ml_collections.ConfigDict, tokenizer: str, train: str, validation: str, out: str):
  stage.data.train_files = [train]
  stage.data.validation_files = [validation]
  stage.data.schema = "pair"
  stage.data.tokenizer = tokenizer
  stage.data.max_prompt_length = 16
  stage.data.max_length = 32
  stage.data.buckets = (32,)
  stage.data.dataset_dir = out
  return stage


def train_reference(config, demo, paths, out: str) -> str:
  """SFT on careful / sloppy / plain demonstrations; returns the exported Hugging Face directory."""
  hf_dir = os.path.join(out, "hf")
  stage = stages_lib.trainer_config(config, SyntheticTask.section)
  stage.objective = "sft"
  _data_config(stage, paths["tokenizer"], paths["sft"], paths["eval"], os.path.join(out, "dataset"))
  data.build_dataset(stage)
  stage.data.batch_size = demo.sft_batch_size
  stage.train.steps = demo.sft_steps
  stage.optimizer.lr = demo.sft_lr
  stage.optimizer.warmup_steps = max(demo.sft_steps // 20, 1)
  stage.data.eval_split = ""
  stage.model.hf_path = ""
  summary = trainer.run(stage, os.path.join(out, "run"))
  if summary.stopped == "preempted":  # SIGTERM saved a checkpoint: stop; a rerun resumes the SFT stage
    raise SystemExit(0)
  models.save_pretrained(summary.model(), hf_dir)
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  AutoTokenizer.from_pretrained(paths["tokenizer"], local_files_only=True).save_pretrained(hf_dir)
  return hf_dir


# --------------------------------------------------------------------------------------------- evaluation


def _batch(tok, prompts: list[list[dict]], responses: list[str]):
  rows = [tok.prompt_ids(p) + tok.response_ids(r) for p, r in zip(prompts, responses)]
  starts = [len(tok.prompt_ids(p)) for p in prompts]
  length = max(map(len, rows))
  tokens = np.full((len(rows), length), tok.pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)  # aligned with labels: labels[t] = tokens[t+1]
  segments = np.zeros((len(rows), length), np.int32)
  for i, (row, start) in enumerate(zip(rows, starts)):
    tokens[i, :len(row)] = row
    segments[i, :len(row)] = 1
    mask[i, start - 1:len(row) - 2] = True  # response tokens without the end-of-turn marker
  labels = np.concatenate([tokens[:, 1:], np.full((len(rows), 1), tok.pad_id, np.int32)], axis=1)
  return tokens, labels, mask, segments


@functools.partial(jax.jit, static_argnums=0)
def token_logps_compiled(graphdef, state, tokens, labels, segments):
  """`token_logps` compiled once per (graphdef, shapes): the weights are an argument (tests count its compiles)."""
  return losses.model_token_logps(nnx.merge(graphdef, state), tokens, labels, chunk_size=32, segment_ids=segments)


def token_logps(model, tokens, labels, segments) -> np.ndarray:
  """The model's weights are an argument, not constants of a fresh closure: one compile per model shape and batch
  shape, whichever of the (reference, policy) models of that shape is evaluated."""
  graphdef, state = nnx.split(model)
  return np.asarray(token_logps_compiled(graphdef, state, jnp.asarray(tokens), jnp.asarray(labels),
                                         jnp.asarray(segments)))


def generated_error_rate(model, tok, world, prompts: list[list[int]], tasks: list[tuple[str, int]],
                         temperature: float, seed: int) -> tuple[float, list[list[str]]]:
  """The oracle's fraction of wrong positions in the policy's own responses (KV-cache `generate`), and the walks."""
  out = decoding.generate(model, prompts, max_new_tokens=world.response_length + 1, key=jax.random.key(seed),
                          temperature=temperature, eos_ids=(tok.end_of_turn_id,), pad_id=tok.pad_id)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  walks, errors = [], []
  for row, (task, start) in enumerate(tasks):
    ids = [int(i) for i in tokens[row, :lengths[row]] if i != tok.end_of_turn_id]
    walks.append(tok.tokenizer.convert_ids_to_tokens(ids))
    errors.append(world.generated_errors(task, start, walks[-1]))
  return float(np.mean(errors)), walks


def evaluate(models_by_name: dict[str, Any], tokenizer_dir: str, demo, eval_pairs_path: str, beta: float,
             better_instruction: str, worse_instruction: str) -> dict:
  """Oracle metrics of every policy, plus the quality of the reference's self-generated token rewards.

  error_mass: mean over held-out prompts and response positions of 1 − π(correct token | prompt, correct prefix).
  greedy_error_rate / sampled_error_rate: the oracle's fraction of wrong positions in the policy's own responses to the
    same prompts, greedy and sampled at temperature 1 (the reference also keeps its greedy walks, for verification).
  token_credit_auc: on held-out pairs (chosen and rejected responses), P(β·(log π − log π_ref) of a correct token >
    that of an erroneous token): how well the policy's implicit token rewards assign credit.
  The reference also gets its error mass under the "better" instruction (the headroom T-REG can draw on) and the AUC of
  its contrastive token rewards r̂_t (the self-generated signal itself).
  """
  world = world_lib.World(demo.num_symbols, demo.response_length, demo.world_seed)
  tok = ChatTokenizer(tokenizer_dir)
  rng = np.random.default_rng(demo.world_seed + 99)
  prompts, correct, tasks = [], [], []
  for _ in range(demo.eval_prompts):
    task, start = world_lib.TASKS[rng.integers(2)], int(rng.integers(world.num_symbols))
    prompts.append([{"role": "user", "content": world_lib.prompt_text(task, start)}])
    correct.append(world_lib.response_text(world.correct_response(task, start)))
    tasks.append((task, start))
  prompt_ids = [tok.prompt_ids(p) for p in prompts]
  tokens, labels, mask, segments = _batch(tok, prompts, correct)

  with open(eval_pairs_path) as f:
    pairs = [json.loads(line) for line in f]
  pair_prompts, pair_responses, is_error = [], [], []
  for p in pairs:
    task, start = p["prompt"].split()
    for text in (p["chosen"], p["rejected"]):
      pair_prompts.append([{"role": "user", "content": p["prompt"]}])
      pair_responses.append(text)
      is_error.append(world.token_errors(task, int(start), np.array(text.split(), int)))
  pair_batch = _batch(tok, pair_prompts, pair_responses)
  p_mask = pair_batch[2]
  is_error = np.concatenate(is_error)

  def error_mass(model, batch):
    logps = token_logps(model, batch[0], batch[1], batch[3])
    return float(np.mean(1.0 - np.exp(logps[batch[2]])))

  def error_mass_interval(model, batch):  # over prompts (every correct walk has the same length)
    per_prompt = np.where(batch[2], 1.0 - np.exp(token_logps(model, batch[0], batch[1], batch[3])), 0.0)
    return stats.mean_interval(per_prompt.sum(1) / batch[2].sum(1))

  reference = models_by_name["reference"]
  reference_logps = token_logps(reference, pair_batch[0], pair_batch[1], pair_batch[3])[p_mask]
  results = {}
  for name, model in models_by_name.items():
    credit = beta * (token_logps(model, pair_batch[0], pair_batch[1], pair_batch[3])[p_mask] - reference_logps)
    greedy, walks = generated_error_rate(model, tok, world, prompt_ids, tasks, 0.0, demo.world_seed)
    sampled, _ = generated_error_rate(model, tok, world, prompt_ids, tasks, 1.0, demo.world_seed)
    mass, low, high = error_mass_interval(model, (tokens, labels, mask, segments))
    results[name] = dict(error_mass=mass, error_mass_low=low, error_mass_high=high,
                         greedy_error_rate=greedy, sampled_error_rate=sampled,
                         token_credit_auc=stats.auc(credit[~is_error], credit[is_error]))
    if name == "reference":
      results[name]["greedy_walks"] = [" ".join(w) for w in walks]

  def instructed(instruction, prompt_list, responses):
    return _batch(tok, [with_instruction(p, instruction, "system") for p in prompt_list], responses)

  better = instructed(better_instruction, pair_prompts, pair_responses)
  worse = instructed(worse_instruction, pair_prompts, pair_responses)
  logp_better = token_logps(reference, better[0], better[1], better[3])[better[2]]
  logp_worse = token_logps(reference, worse[0], worse[1], worse[3])[worse[2]]
  self_rewards = np.asarray(losses.contrastive_token_rewards(logp_better[None], logp_worse[None],
                                                             np.ones((1, len(logp_better)), bool)))[0]
  results["reference"].update(
      error_mass_with_better_instruction=error_mass(reference, instructed(better_instruction, prompts, correct)),
      self_generated_reward_auc=stats.auc(self_rewards[~is_error], self_rewards[is_error]),
      self_generated_reward_mean_correct=float(self_rewards[~is_error].mean()),
      self_generated_reward_mean_error=float(self_rewards[is_error].mean()))
  return results




# ----------------------------------------------------------------------------------------- the runner's task


COLUMNS = (("error_mass", "error mass", ".4f"), ("greedy_error_rate", "greedy err", ".4f"),
           ("sampled_error_rate", "sampled err", ".4f"), ("token_credit_auc", "credit AUC", ".3f"),
           ("eval_accuracy", "eval acc", ".3f"))


class SyntheticTask:
  """The synthetic world (tregjax/synthetic/world.py) for `tregjax.experiments.runner`."""
  name = "synthetic"
  section = "demo"

  def __init__(self, config: ml_collections.ConfigDict):
    self.demo = config_schema.merge(self.section, world_lib.demo_section(), config.get(self.section, None))
    self.world = world_lib.World(self.demo.num_symbols, self.demo.response_length, self.demo.world_seed)
    self._tok = None
    self.tokenizer_dir = ""  # set by prepare

  def prepare(self, config: ml_collections.ConfigDict, stages: stages_lib.Stages) -> stages_lib.Prepared:
    """Write the world, then SFT a reference that reacts to the careful / sloppy system prompts."""
    out = stages.path("world")
    world_key = self.demo.to_dict()
    if stages.done("world", world_key):
      paths = dict(tokenizer=os.path.join(out, "tokenizer"), sft=os.path.join(out, "sft.jsonl"),
                   train=os.path.join(out, "pairs_train.jsonl"), eval=os.path.join(out, "pairs_eval.jsonl"))
    else:
      started = time.perf_counter()
      paths = write_world(self.demo, out)
      stages.finish("world", started, key=world_key)
    self.tokenizer_dir = paths["tokenizer"]
    reference = os.path.join(stages.path("reference"), "hf")
    # The SFT stage reads neither the preference loss nor the scoring pass: an α sweep keeps the reference.
    sft_inputs = {k: v for k, v in stages_lib.stage_key(stages_lib.trainer_config(config, self.section)).items()
                  if k not in ("loss", "score")}
    reference_key = dict(world=world_key, trainer=sft_inputs)
    if not stages.done("reference", reference_key):
      started = time.perf_counter()
      train_reference(config, self.demo, paths, stages.path("reference"))
      stages.finish("reference", started, key=reference_key)
    return stages_lib.Prepared(reference=reference, tokenizer=paths["tokenizer"], train_pairs=paths["train"],
                               eval_pairs=paths["eval"], data=dict(max_prompt_length=16, max_length=32, buckets=(32,)))

  def token_labels(self, prompt_messages: list[dict[str, str]], response_ids: Sequence[int]) -> np.ndarray:
    """+1 / −1 per number token by the world's rule; 0 for the end-of-turn token."""
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    if self._tok is None:
      self._tok = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
    task, start = prompt_messages[-1]["content"].split()
    words = self._tok.convert_ids_to_tokens([int(i) for i in response_ids])
    numbers = [w for w in words if w.isdigit()]
    if len(numbers) != len(words) - 1 or not words[-1] == world_lib.EOS:
      raise ValueError(f"not a walk of this world: {words}")
    errors = self.world.token_errors(task, int(start), np.array(numbers, int))
    return np.concatenate([np.where(errors, -1, 1), [0]]).astype(np.int8)

  def evaluate(self, config: ml_collections.ConfigDict, stages: stages_lib.Stages, prepared: stages_lib.Prepared,
               policies: dict[str, str]) -> dict[str, Any]:
    """The oracle metrics of every policy (see `evaluate`), a table, and the error mass per policy for the plot."""
    loaded = {name: models.from_pretrained(path, dtype=jnp.float32) for name, path in policies.items()}
    results = evaluate(loaded, prepared.tokenizer, self.demo, prepared.eval_pairs, beta=config.loss.beta,
                       better_instruction=config.score.better_instruction,
                       worse_instruction=config.score.worse_instruction)
    results["reference"]["token_credit_auc"] = float("nan")  # β·(log π_ref − log π_ref) = 0: no ranking to score
    for name in policies:
      if name != "reference":
        info = stages.info(f"arms/{name}")
        results[name]["eval_accuracy"] = (info.get("eval_metrics") or {}).get("eval/rewards/accuracy", float("nan"))
    ref = results["reference"]
    lines = [f"{'policy':<34} " + " ".join(f"{h:>11}" for _, h, _ in COLUMNS) + f" {'Δ mass vs ref':>14}"]
    for name, r in results.items():
      label = arms.label(name, "reference (SFT)")
      lines.append(f"{label:<34} " + " ".join(f"{runner.fmt(r.get(k), f):>11}" for k, _, f in COLUMNS) +
                   f" {r['error_mass'] - ref['error_mass']:>+14.4f}")
    notes = [f"reference with the better instruction: error mass {ref['error_mass_with_better_instruction']:.4f}; "
             f"its self-generated token rewards: AUC {ref['self_generated_reward_auc']:.3f}, mean r̂ on correct "
             f"tokens {ref['self_generated_reward_mean_correct']:+.3f}, on errors "
             f"{ref['self_generated_reward_mean_error']:+.3f} (held-out pairs)"]
    if "dpo" in results and "dpo_reg" in results:
      dpo, reg = results["dpo"]["error_mass"], results["dpo_reg"]["error_mass"]
      verdict = "helps" if reg < dpo else "does not help"
      notes.append(f"Token-level regularisation {verdict} here: DPO-REG error mass {reg:.4f} vs DPO {dpo:.4f} "
                   f"({(reg - dpo) / max(dpo, 1e-12):+.0%}); in their own sampled responses "
                   f"{results['dpo_reg']['sampled_error_rate']:.4f} vs {results['dpo']['sampled_error_rate']:.4f}")
    header = ("error mass = mean over held-out prompts and positions of 1 − π(correct token | correct prefix) (lower "
              "is better); greedy / sampled err = the oracle's fraction of wrong positions in the policy's own greedy /"
              " temperature-1 responses; credit AUC = P(implicit token reward β·(log π − log π_ref) of a correct token"
              " > that of an erroneous one) on held-out pairs.")
    plot = [report.Estimate(arms.label(n, "reference (SFT)"), r["error_mass"],
                            r["error_mass_low"], r["error_mass_high"]) for n, r in results.items()]
    return dict(policies=results, table=header + "\n" + "\n".join(lines), notes=notes, plot=plot,
                plot_title="error mass (lower is better)", plot_reference=ref["error_mass"])
