"""The embedded default run: build the synthetic world, SFT a reference, score pairs, train each arm, compare.

Every stage is the project's real machinery (tokenizer + chat template, TFDS dataset, the scoring pass with contrastive
prompts, the trainer with Orbax checkpoints); only the data are synthetic. Stages are cached in the workdir, so a
second run (or a run resumed after a kill) skips what is already complete.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tregjax import losses
from tregjax.synthetic import world as world_lib

log = logging.getLogger("tregjax.demo")

# Arms: name -> overrides of config.loss. "dpo_reg" is T-REG; the others are the paper's baselines and ablations.
ARMS: dict[str, dict[str, Any]] = {
    "dpo": dict(loss="dpo", regularizer="none"),
    "dpo_reg": dict(loss="dpo", regularizer="treg", weighting="dynamic"),
    "dpo_reg_static": dict(loss="dpo", regularizer="treg", weighting="static"),
    "dpo_sft": dict(loss="dpo", regularizer="sft"),
    "tgdpo": dict(loss="tgdpo", regularizer="none"),
    "simpo": dict(loss="simpo", regularizer="none"),
    "simpo_reg": dict(loss="simpo", regularizer="treg"),
}


def demo_section() -> ml_collections.ConfigDict:
  """Keys of `config.demo` (configs/demo.py sets them); everything else in the config is the trainer's."""
  return ml_collections.ConfigDict(dict(
      num_symbols=32, response_length=10, world_seed=0, max_plain_error=0.4,
      sft_examples=6000, sft_steps=600, sft_lr=3e-3, sft_batch_size=64,
      train_pairs=2048, eval_pairs=256, eval_prompts=256,
      arms=("dpo", "dpo_reg", "dpo_reg_static", "dpo_sft")))


def _stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The trainer's part of the demo config (a fresh, unlocked copy without the `demo` section)."""
  d = config.to_dict()
  d.pop("demo", None)
  return ml_collections.ConfigDict(d)


def _done(path: str) -> bool:
  return os.path.exists(os.path.join(path, "DONE"))


def _mark_done(path: str, info: dict | None = None) -> None:
  tmp = os.path.join(path, "DONE.tmp")
  with open(tmp, "w") as f:
    json.dump(info or {}, f)
  os.replace(tmp, os.path.join(path, "DONE"))


def write_world(demo: ml_collections.ConfigDict, out: str) -> dict[str, str]:
  """Tokenizer + JSONL files of the world (SFT demonstrations, train / eval preference pairs)."""
  world = world_lib.World(demo.num_symbols, demo.response_length, demo.world_seed)
  paths = dict(tokenizer=os.path.join(out, "tokenizer"), sft=os.path.join(out, "sft.jsonl"),
               train=os.path.join(out, "pairs_train.jsonl"), eval=os.path.join(out, "pairs_eval.jsonl"))
  if _done(out):
    return paths
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
  _mark_done(out)
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
  from tregjax import data, models  # pylint: disable=g-import-not-at-top
  from tregjax.training import trainer  # pylint: disable=g-import-not-at-top
  hf_dir = os.path.join(out, "hf")
  if _done(out):
    return hf_dir
  stage = _stage_config(config)
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
  model = nnx.merge(summary["graphdef"], summary["state"].params, summary["state"].extra)
  models.save_pretrained(model, hf_dir)
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  AutoTokenizer.from_pretrained(paths["tokenizer"], local_files_only=True).save_pretrained(hf_dir)
  _mark_done(out, {"final_metrics": summary["final_metrics"]})
  return hf_dir


def score_pairs(config, demo, paths, reference: str, out: str) -> str:
  """The scoring pass: reference log-probs and contrastive token rewards (careful vs sloppy) for every pair."""
  from tregjax import data, score  # pylint: disable=g-import-not-at-top
  if _done(out):
    return os.path.join(out, "cache")
  stage = _stage_config(config)
  _data_config(stage, paths["tokenizer"], paths["train"], paths["eval"], os.path.join(out, "dataset"))
  stage.model.hf_path = reference
  stage.model.overrides = ml_collections.ConfigDict()
  stage.model.dtype = "float32"
  data.build_dataset(stage)
  stage.data.cache_dir = os.path.join(out, "cache")
  cache = score.run(stage)
  _mark_done(out)
  return cache


def train_arm(config, paths, reference: str, scored: str, arm: str, out: str):
  """One arm from the reference. Model, tokenizer, prompts and dataset are the scoring stage's, so the trainer's
  stale-cache check (`tregjax.score.check_cache`) accepts the cache."""
  from tregjax.training import trainer  # pylint: disable=g-import-not-at-top
  stage = _stage_config(config)
  stage.objective = "preference"
  _data_config(stage, paths["tokenizer"], paths["train"], paths["eval"], os.path.join(scored, "dataset"))
  stage.model.hf_path = reference
  stage.model.overrides = ml_collections.ConfigDict()  # the architecture now comes from the reference's config.json
  stage.data.cache_dir = os.path.join(scored, "cache")
  for key, value in ARMS[arm].items():
    stage.loss[key] = value
  summary = trainer.run(stage, out)
  model = nnx.merge(summary["graphdef"], summary["state"].params, summary["state"].extra)
  return model, summary


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


def token_logps(model, tokens, labels, segments) -> np.ndarray:
  @jax.jit
  def f(tokens, labels, segments):
    hidden = model.hidden_states(tokens, segment_ids=segments)
    return losses.chunked_token_logps(hidden, labels, model.unembed, chunk_size=32)

  return np.asarray(f(jnp.asarray(tokens), jnp.asarray(labels), jnp.asarray(segments)))


def generated_error_rate(model, tok, world, prompts: list[list[int]], tasks: list[tuple[str, int]],
                         temperature: float, seed: int) -> tuple[float, list[list[str]]]:
  """The oracle's fraction of wrong positions in the policy's own responses (KV-cache `generate`), and the walks."""
  from tregjax.models import decoding  # pylint: disable=g-import-not-at-top
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
  from tregjax.data.tokenize import ChatTokenizer, with_instruction  # pylint: disable=g-import-not-at-top
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

  reference = models_by_name["reference"]
  reference_logps = token_logps(reference, pair_batch[0], pair_batch[1], pair_batch[3])[p_mask]
  results = {}
  for name, model in models_by_name.items():
    credit = beta * (token_logps(model, pair_batch[0], pair_batch[1], pair_batch[3])[p_mask] - reference_logps)
    greedy, walks = generated_error_rate(model, tok, world, prompt_ids, tasks, 0.0, demo.world_seed)
    sampled, _ = generated_error_rate(model, tok, world, prompt_ids, tasks, 1.0, demo.world_seed)
    results[name] = dict(error_mass=error_mass(model, (tokens, labels, mask, segments)),
                         greedy_error_rate=greedy, sampled_error_rate=sampled,
                         token_credit_auc=world_lib.auc(credit[~is_error], credit[is_error]))
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
      self_generated_reward_auc=world_lib.auc(self_rewards[~is_error], self_rewards[is_error]),
      self_generated_reward_mean_correct=float(self_rewards[~is_error].mean()),
      self_generated_reward_mean_error=float(self_rewards[is_error].mean()))
  return results


def _table(results: dict, summaries: dict) -> str:
  lines = [f"{'policy':<16} {'error mass':>11} {'Δ vs ref':>9} {'greedy err':>11} {'sampled err':>12} "
           f"{'credit AUC':>11} {'eval acc':>9} {'eval margin':>12}"]
  ref = results["reference"]["error_mass"]
  for name, r in results.items():
    ev = summaries.get(name, {}).get("eval_metrics", {}) if name != "reference" else {}
    acc = ev.get("eval/rewards/accuracy", float("nan"))
    margin = ev.get("eval/rewards/margin", float("nan"))
    auc = r["token_credit_auc"] if name != "reference" else float("nan")
    lines.append(f"{name:<16} {r['error_mass']:>11.4f} {r['error_mass'] - ref:>+9.4f} {r['greedy_error_rate']:>11.4f} "
                 f"{r['sampled_error_rate']:>12.4f} {auc:>11.3f} {acc:>9.3f} {margin:>12.3f}")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The whole demo; returns and writes (workdir/demo_results.json) the comparison of the arms."""
  from tregjax import models  # pylint: disable=g-import-not-at-top
  demo = config.demo
  unknown = [a for a in demo.arms if a not in ARMS]
  if unknown:
    raise ValueError(f"config.demo.arms: unknown {unknown}; choose from {sorted(ARMS)}")
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  paths = write_world(demo, os.path.join(workdir, "world"))
  print(f"[demo] world written to {os.path.join(workdir, 'world')}", flush=True)
  reference = train_reference(config, demo, paths, os.path.join(workdir, "reference"))
  print(f"[demo] reference (SFT) exported to {reference} ({time.perf_counter() - t0:.0f}s)", flush=True)
  cache = score_pairs(config, demo, paths, reference, os.path.join(workdir, "scored"))
  print(f"[demo] scored cache at {cache} ({time.perf_counter() - t0:.0f}s)", flush=True)
  policies = {"reference": models.from_pretrained(reference, dtype=jnp.float32)}
  summaries = {}
  for arm in demo.arms:
    model, summary = train_arm(config, paths, reference, os.path.join(workdir, "scored"), arm,
                               os.path.join(workdir, "arms", arm))
    policies[arm] = model
    summaries[arm] = {k: summary[k] for k in ("final_metrics", "eval_metrics", "step")}
    print(f"[demo] trained {arm} ({time.perf_counter() - t0:.0f}s)", flush=True)
  results = evaluate(policies, paths["tokenizer"], demo, paths["eval"], beta=config.loss.beta,
                     better_instruction=config.score.better_instruction,
                     worse_instruction=config.score.worse_instruction)
  table = _table(results, summaries)
  ref = results["reference"]
  print("\nError mass = mean over held-out prompts and positions of 1 − π(correct token | correct prefix) (lower is "
        "better);\ngreedy / sampled err = the oracle's fraction of wrong positions in the policy's own greedy / "
        "temperature-1 responses;\ncredit AUC = P(implicit token reward β·(log π − log π_ref) of a correct token > "
        "that of an erroneous one) on held-out pairs.\n" + table +
        f"\n\nreference with the better instruction: error mass {ref['error_mass_with_better_instruction']:.4f}; "
        f"self-generated token rewards: AUC {ref['self_generated_reward_auc']:.3f}, mean r̂ on correct tokens "
        f"{ref['self_generated_reward_mean_correct']:+.3f}, on errors {ref['self_generated_reward_mean_error']:+.3f}",
        flush=True)
  if "dpo" in results and "dpo_reg" in results:
    dpo, reg = results["dpo"]["error_mass"], results["dpo_reg"]["error_mass"]
    sampled_dpo, sampled_reg = results["dpo"]["sampled_error_rate"], results["dpo_reg"]["sampled_error_rate"]
    verdict = "helps" if reg < dpo else "does not help"
    print(f"\nToken-level regularisation {verdict} here: DPO-REG error mass {reg:.4f} vs DPO {dpo:.4f} "
          f"({(reg - dpo) / max(dpo, 1e-12):+.0%}); in their own sampled responses {sampled_reg:.4f} vs "
          f"{sampled_dpo:.4f}; results in {os.path.join(workdir, 'demo_results.json')}", flush=True)
  out = dict(results=results, arms=summaries, seconds=time.perf_counter() - t0)
  with open(os.path.join(workdir, "demo_results.json.tmp"), "w") as f:
    json.dump(out, f, indent=2)
  os.replace(os.path.join(workdir, "demo_results.json.tmp"), os.path.join(workdir, "demo_results.json"))
  return out
