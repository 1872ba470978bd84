"""A SmolLM2 arithmetic experiment that can see its own ceiling (#28 item 4): a dense metric, an α sweep of the
oracle arm tuned on a validation split, and each token-reward source's share of the ceiling.

    python -m tregjax.train --config configs/credit_ceiling.py[:tiny|:mini]

Greedy accuracy on ~50 pairs and ~12 steps cannot tell the oracle arm from DPO (0.142 vs 0.142), so no source can be
judged by training. The dense metric here moves with far smaller changes of the policy:

  result probability   on held-out problems, the policy's teacher-forced probability of each equation's correct
                       result, given the reference's own greedy response up to that result (`result_targets`):
                       π(str(true value of a op b ...) | prompt, reference response[:result start]); averaged over
                       a problem's equations, then over problems (Student t 95% over problems; paired over the same
                       problems against DPO). The arithmetic counterpart of the synthetic world's error mass.

Stages (in the workdir, cached; the arithmetic task's problems, reference and samples, the runner's scoring stage):
  problems, reference, samples, scored/*   as in configs/smollm2_arith.py (tasks/arith_experiment.ArithTask)
  eval/reference      the reference's greedy responses to the held-out problems (their equations give the targets)
  arms/<setting>      DPO; DPO-REG with the oracle's token rewards at each α of `ceiling.alphas` under each regulariser
                      normalisation of `ceiling.normalizations` (a "mean" setting trains at α · mean_alpha_scale, so
                      that α reaches as far under either: the mean divides by the response length); then the other
                      sources of `ceiling.sources` (confidence, contrastive) at each α under the normalisation the
                      oracle validated. Within each, the largest α first (`training_order`).
  dense/<policy>      the result probability of each policy on every held-out problem, right after its arm
The held-out problems are split: the first `ceiling.val_prompts` are the validation split (each source's setting is
chosen there, by the highest mean result probability), the rest the test split (where only the chosen settings are
compared with DPO). Reported: every setting on both splits; the smallest setting at which the oracle arm beats DPO on
validation with a paired interval that excludes zero, and its test figure; each source at its validated setting on
test, and its share of the ceiling, (source − DPO) / (oracle − DPO), with a paired bootstrap over test problems
(`ceiling_share`). results.json (rewritten after every arm, `partial` until the last) and a table in the workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from transformers import AutoTokenizer

from tregjax import config_schema, errors, generate, losses, models, storage
from tregjax.experiments import arms as arms_lib
from tregjax.experiments import runner, stats
from tregjax.experiments import stages as stages_lib
from tregjax.data.tokenize import ChatTokenizer
from tregjax.tasks import arith, arith_experiment, sections
from tregjax.training import trainer

# Each source's arm of tregjax.experiments.arms (its loss and scored cache); the sweep overrides loss.alpha and
# loss.reg_normalization.
SOURCE_ARMS = {"oracle": "dpo_reg_oracle", "confidence": "dpo_reg_conf", "contrastive": "dpo_reg"}


def default_ceiling_config() -> ml_collections.ConfigDict:
  """The `ceiling` section (tasks/sections.py holds it, so that config files stay light)."""
  return sections.default_ceiling_config()


def ceiling_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.ceiling` over the defaults, checked (errors.ConfigError naming the key)."""
  section = config_schema.merge("ceiling", default_ceiling_config(), config.get("ceiling", None))
  unknown = [s for s in section.sources if s not in SOURCE_ARMS]
  if unknown or "oracle" not in section.sources:
    raise errors.ConfigError(f"config.ceiling.sources: {tuple(section.sources)} must include 'oracle' and only "
                     f"{tuple(SOURCE_ARMS)}")
  if not section.alphas or any(float(a) <= 0 for a in section.alphas):
    raise errors.ConfigError(f"config.ceiling.alphas: positive values required, got {tuple(section.alphas)}")
  bad = [n for n in section.normalizations if n not in ("sum", "mean")]
  if bad or not section.normalizations:
    raise errors.ConfigError(f"config.ceiling.normalizations: 'sum' and/or 'mean', got "
                             f"{tuple(section.normalizations)}")
  if not float(section.mean_alpha_scale) > 0:
    raise errors.ConfigError(f"config.ceiling.mean_alpha_scale: a positive number required, got "
                             f"{section.mean_alpha_scale}")
  if int(section.arm_grad_accum_steps) < 0:
    raise errors.ConfigError(f"config.ceiling.arm_grad_accum_steps: 0 (the trainer's) or a positive count, got "
                             f"{section.arm_grad_accum_steps}")
  if int(section.val_prompts) < 2:
    raise errors.ConfigError(f"config.ceiling.val_prompts: at least 2, got {section.val_prompts}")
  return section


# ------------------------------------------------------------------------------------------------ dense metric


def result_targets(text: str) -> list[tuple[int, str]]:
  """(start of the stated result, the correct result as text) of every explicit equation of `text` whose left side
  has a non-negative integer value (arith.equations; the problems have no negative or fractional step)."""
  out = []
  for eq in arith.equations(text):
    if eq.value is None or eq.value < 0 or abs(eq.value - round(eq.value)) > 1e-9:
      continue
    if eq.result_start > 0 and text[eq.result_start - 1] in "-\u2212":
      continue  # a result written as negative: its prefix holds a sign the correct value does not have
    out.append((eq.result_start, str(int(round(eq.value)))))
  return out


@dataclasses.dataclass
class DenseRow:
  """One sequence to teacher-force: its ids, and per target the positions (into ids) of the result's tokens."""
  ids: list[int]
  targets: list[list[int]]


def dense_rows(tok: Any, prompt_ids: Sequence[int], text: str) -> tuple[list[DenseRow], int]:
  """The sequences that give every target of `text` (`result_targets`): prompt + text[:result start] + correct
  result. A target whose sequence is a prefix of a longer one (the reference wrote that result right, so the text
  goes on from it) is read from the longer one. Returns (rows, number of targets).

  The result's tokens are those whose characters overlap the result (the tokenizer's own offsets)."""
  prompt_ids = [int(i) for i in prompt_ids]
  encoded = []
  for start, value in result_targets(text):
    enc = tok(text[:start] + value, add_special_tokens=False, return_offsets_mapping=True)
    positions = [len(prompt_ids) + t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < start + len(value)
                 and b > start]
    if positions:
      encoded.append((prompt_ids + list(enc["input_ids"]), positions))
  rows: list[DenseRow] = []
  full = prompt_ids + list(tok(text, add_special_tokens=False)["input_ids"])
  for ids, positions in sorted(encoded, key=lambda e: -len(e[0])):
    home = next((r for r in rows if r.ids[:len(ids)] == ids), None)
    if home is None:
      if full[:len(ids)] == ids:
        home = next((r for r in rows if r.ids == full), None)
        if home is None:
          home = DenseRow(full, [])
          rows.append(home)
      else:
        home = DenseRow(ids, [])
        rows.append(home)
    home.targets.append(positions)
  for row in rows:  # nothing after the last target is needed
    row.ids = row.ids[:max(p for t in row.targets for p in t) + 1]
  return rows, len(encoded)


@functools.partial(jax.jit, static_argnums=0)
def _token_logps(graphdef, state, tokens, labels):
  """log π(label_t | tokens_<=t), float32, [B, T]: one compile per padded shape for every policy measured."""
  return losses.model_token_logps(nnx.merge(graphdef, state), tokens, labels, chunk_size=64)


def result_probabilities(model: Any, rows: Sequence[DenseRow], *, batch_size: int = 8, bucket: int = 64,
                         pad_id: int = 0) -> list[list[float]]:
  """Per row, per target: π(result tokens | everything before them) = exp(Σ log π of the result's tokens), float32
  log-softmax (losses.model_token_logps). Rows are right-padded (causal attention: padding after a position does not
  change it) to a multiple of `bucket` and batched `batch_size` at a time (one compile per padded length)."""
  if batch_size < 1 or bucket < 1:
    raise ValueError(f"batch_size and bucket must be positive, got {batch_size}, {bucket}")
  graphdef, state = nnx.split(model)
  out: list[list[float]] = [[] for _ in rows]
  order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
  for s in range(0, len(order), batch_size):
    chunk = order[s:s + batch_size]
    length = -(-max(len(rows[i].ids) for i in chunk) // bucket) * bucket
    tokens = np.full((batch_size, length), pad_id, np.int32)
    for r, i in enumerate(chunk):
      tokens[r, :len(rows[i].ids)] = rows[i].ids
    labels = np.concatenate([tokens[:, 1:], np.full((batch_size, 1), pad_id, np.int32)], axis=1)
    logps = np.asarray(_token_logps(graphdef, state, jnp.asarray(tokens), jnp.asarray(labels)), np.float64)
    for r, i in enumerate(chunk):  # the token at position p is predicted at p - 1
      out[i] = [float(np.exp(sum(logps[r, p - 1] for p in target))) for target in rows[i].targets]
  return out


def problem_scores(model: Any, tok: Any, prompts: Sequence[Sequence[int]], texts: Sequence[str], *,
                   batch_size: int = 8, bucket: int = 64, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(mean result probability per problem, NaN where its response has no equation to read; targets per problem)."""
  rows, owner, counts = [], [], []
  for k, (prompt, text) in enumerate(zip(prompts, texts)):
    r, n = dense_rows(tok, prompt, text)
    rows += r
    owner += [k] * len(r)
    counts.append(n)
  probs = result_probabilities(model, rows, batch_size=batch_size, bucket=bucket, pad_id=pad_id)
  per: list[list[float]] = [[] for _ in texts]
  for k, p in zip(owner, probs):
    per[k] += p
  return np.array([np.mean(p) if p else np.nan for p in per], np.float64), np.array(counts)


# ------------------------------------------------------------------------------------------------ the program


def setting_name(source: str, alpha: float, normalization: str) -> str:
  return f"{source}_a{float(alpha):g}_{normalization}"


def trained_alpha(section: ml_collections.ConfigDict, alpha: float, normalization: str) -> float:
  """The loss.alpha of a setting: α itself under "sum"; α · mean_alpha_scale under "mean", which divides the
  regulariser by the response length L (so α·L̄ under mean weighs a response of the mean length as α under sum)."""
  return float(alpha) * (float(section.mean_alpha_scale) if normalization == "mean" else 1.0)


def settings(section: ml_collections.ConfigDict, sources: Sequence[str] | None = None,
             normalizations: Sequence[str] | None = None) -> dict[str, tuple[str, float, str]]:
  """Trained policies but DPO: name -> (source, loss.alpha, normalisation) for each of `sources` x `normalizations`
  x `ceiling.alphas` (default: the section's), in the config's order. `run` trains the oracle at every normalisation
  and the other sources at the oracle's validated one."""
  sources = section.sources if sources is None else sources
  normalizations = section.normalizations if normalizations is None else normalizations
  return {setting_name(s, trained_alpha(section, a, n), n): (s, trained_alpha(section, a, n), str(n))
          for s in sources for n in normalizations for a in section.alphas}


def training_order(names: dict[str, tuple[str, float, str]]) -> list[str]:
  """The largest α of every (source, normalisation) first, then the next largest, and so on: a sweep cut short (a
  shared CPU, a preempted job) has each setting's farthest reach, where the oracle gained most at :mini."""
  groups: dict[tuple[str, str], list[str]] = {}
  for name, (source, _, norm) in names.items():
    groups.setdefault((source, norm), []).append(name)
  ranked = [sorted(g, key=lambda n: -names[n][1]) for g in groups.values()]
  return [g[r] for r in range(max(map(len, ranked), default=0)) for g in ranked if r < len(g)]


def arm_stage(config, task, prepared, stages, source: str, alpha: float, normalization: str,
              grad_accum_steps: int = 0) -> ml_collections.ConfigDict:
  """The trainer config of one setting: the source's arm (runner.arm_stage) with its α and normalisation (and
  `grad_accum_steps` micro-batches per step where not 0: ceiling.arm_grad_accum_steps)."""
  stage = runner.arm_stage(config, task, prepared, stages, SOURCE_ARMS[source])
  stage.loss.alpha = float(alpha)  # as trained: settings() has already scaled a mean setting's α
  stage.loss.reg_normalization = str(normalization)
  if grad_accum_steps:
    stage.optimizer.grad_accum_steps = int(grad_accum_steps)
  return stage


def train(config, task, prepared, stages, name: str, stage: ml_collections.ConfigDict, rewards: str) -> str:
  """One arm from the reference (cached by its stage key, as runner.train_arm); its HF export's directory.

  Micro-batching changes memory, not the update (every example weighs the same), so an arm finished at the trainer's
  own `optimizer.grad_accum_steps` is reused where `stage` asks for other micro-batches (ceiling.arm_grad_accum_steps)."""
  hf = os.path.join(stages.path(f"arms/{name}"), "hf")
  key = stages_lib.stage_key(stage)
  if os.path.exists(os.path.join(stages.path(f"arms/{name}"), "DONE")):
    same = stage.copy_and_resolve_references()
    same.optimizer.grad_accum_steps = int(config.optimizer.grad_accum_steps)
    if stages.info(f"arms/{name}").get("key") == stages.key_hash(stages_lib.stage_key(same)):
      return hf
  if stages.done(f"arms/{name}", key):
    return hf
  runner.score_stage(config, task, prepared, stages, rewards)  # its own stage (and CPU figure) when first scored
  started, cpu = time.perf_counter(), time.process_time()
  summary = trainer.run(stage, os.path.join(stages.path(f"arms/{name}"), "run"))
  runner.exit_if_preempted(summary, stages, f"arms/{name}")
  models.save_pretrained(summary.model(), hf,
                         tokenizer=AutoTokenizer.from_pretrained(prepared.tokenizer, local_files_only=True))
  stages.finish(f"arms/{name}", started, dict({k: getattr(summary, k) for k in ("final_metrics", "step")},
                                             cpu_seconds=round(time.process_time() - cpu, 1)), key=key)
  return hf


def dense_stage(stages, name: str, policy: str, prepared, records: list[dict[str, Any]],
                section: ml_collections.ConfigDict) -> np.ndarray:
  """The result probability of `policy` on every held-out problem (cached in dense/<name>/DONE)."""
  key = dict(policy=policy, responses=[r["all_generated_responses"][0] for r in records], metric="result_prob/1")
  if stages.done(f"dense/{name}", key):
    return np.array(stages.info(f"dense/{name}")["per_problem"], np.float64)
  started, cpu = time.perf_counter(), time.process_time()
  tok = ChatTokenizer(prepared.tokenizer)
  model = models.from_pretrained(policy, dtype=jnp.float32)
  scores, _ = problem_scores(model, tok.tokenizer, [tok.prompt_ids(r["prompt"]) for r in records],
                             [r["all_generated_responses"][0] for r in records], batch_size=int(section.batch_size),
                             bucket=int(section.bucket), pad_id=tok.pad_id)
  stages.finish(f"dense/{name}", started, dict(per_problem=[None if np.isnan(s) else float(s) for s in scores],
                                              cpu_seconds=round(time.process_time() - cpu, 1)), key=key)
  return scores


def _fmt(mean: float, low: float, high: float, sign: str = "") -> str:
  return f"{mean:{sign}.4f} [{low:{sign}.4f}, {high:{sign}.4f}]"


def ceiling_share(source: np.ndarray, oracle: np.ndarray, dpo: np.ndarray, *, seed: int = 0,
                  resamples: int = 2000) -> dict[str, Any]:
  """A source's share of the ceiling on the dense metric: (mean source − mean DPO) / (mean oracle − mean DPO) over
  problems, with a paired percentile bootstrap 95%: problems are resampled once per draw and the ratio is computed on
  that draw (all three policies on the same problems).

  The ratio is only as stable as its denominator: a draw whose oracle gain is not positive has no share (undefined,
  not 0 or ±inf). Where more than 2.5% of draws are undefined the denominator's own interval reaches 0 and the
  ratio's interval is unbounded: it is reported as NaN, `unstable` is set, and the oracle gain's interval says why.
  Returns share, low, high, oracle_gain (mean, low, high of the same draws), undefined (fraction of draws), unstable.
  """
  source, oracle, dpo = (np.asarray(x, np.float64) for x in (source, oracle, dpo))
  if not source.shape == oracle.shape == dpo.shape or source.ndim != 1 or source.size < 2:
    raise ValueError(f"source, oracle and dpo must be equal-length 1-d arrays of at least 2 problems, got shapes "
                     f"{source.shape}, {oracle.shape}, {dpo.shape}")
  n = len(source)
  rng = np.random.default_rng(seed)
  idx = np.concatenate([np.arange(n)[None], rng.integers(0, n, (resamples, n))])  # row 0: the problems themselves
  gain = oracle[idx].mean(1) - dpo[idx].mean(1)
  lift = source[idx].mean(1) - dpo[idx].mean(1)
  ratio = np.where(gain > 0, lift / np.where(gain > 0, gain, 1.0), np.nan)
  undefined = float(np.isnan(ratio[1:]).mean())
  unstable = undefined > 0.025
  low, high = (float("nan"), float("nan")) if unstable else np.nanpercentile(ratio[1:], [2.5, 97.5])
  gain_low, gain_high = np.percentile(gain[1:], [2.5, 97.5])
  return dict(share=float(ratio[0]), low=float(low), high=float(high),
              oracle_gain=dict(mean=float(gain[0]), low=float(gain_low), high=float(gain_high)),
              undefined=undefined, unstable=bool(unstable))


def analyse(per: dict[str, np.ndarray], names: dict[str, tuple[str, float, str]], val: int, seed: int = 0,
            mean_alpha_scale: float = 1.0) -> dict[str, Any]:
  """Validation/test figures of every policy, the validated setting of each source, the smallest oracle setting that
  beats DPO on validation, and each source's share of the ceiling on test. `per`: policy -> per-problem scores over
  all held-out problems (DPO under "dpo"); problems without a target (NaN for every policy) are left out. A mean
  setting's α is divided by `mean_alpha_scale` to rank it among the sum settings ("smallest")."""
  keep = ~np.isnan(per["dpo"])
  split = {"val": np.flatnonzero(keep[:val]), "test": val + np.flatnonzero(keep[val:])}
  out: dict[str, Any] = dict(problems={k: int(len(v)) for k, v in split.items()}, policies={})
  for policy, scores in per.items():
    row = {}
    for part, idx in split.items():
      row[part] = dict(zip(("mean", "low", "high"), stats.mean_interval(scores[idx])))
      if policy != "dpo":
        row[f"{part} - dpo"] = dict(zip(("mean", "low", "high"), stats.paired_difference(scores[idx],
                                                                                         per["dpo"][idx])))
    out["policies"][policy] = row
  # The smallest oracle setting (reach α, then normalisation in the config's order) that beats DPO on validation.
  oracle = [n for n, (s, _, _) in names.items() if s == "oracle"]
  reach = {n: a / (mean_alpha_scale if m == "mean" else 1.0) for n, (_, a, m) in names.items()}
  beating = [n for n in sorted(oracle, key=lambda n: reach[n]) if out["policies"][n]["val - dpo"]["low"] > 0]
  out["smallest_oracle_beating_dpo"] = beating[0] if beating else None
  chosen = {}
  for source in dict.fromkeys(s for s, _, _ in names.values()):
    candidates = [n for n, (s, _, _) in names.items() if s == source]
    chosen[source] = max(candidates, key=lambda n: out["policies"][n]["val"]["mean"])
  out["validated"] = chosen
  test = split["test"]
  out["share_of_ceiling"] = {
      source: dict(ceiling_share(per[name][test], per[chosen["oracle"]][test], per["dpo"][test], seed=seed),
                   setting=name)
      for source, name in chosen.items() if source != "oracle"}
  return out


def table(analysis: dict[str, Any], names: dict[str, tuple[str, float, str]]) -> str:
  p = analysis["problems"]
  lines = [f"result probability π(correct equation result | reference's response prefix), mean over problems "
           f"[Student t 95%]; Δ: paired over the same problems. Validation {p['val']} problems, test {p['test']}.",
           f"{'policy':<28}{'validation':>28}{'Δ vs DPO, validation':>30}{'test':>28}{'Δ vs DPO, test':>30}"]
  for policy, row in analysis["policies"].items():
    cells = [_fmt(**row["val"]), _fmt(**row["val - dpo"], sign="+") if "val - dpo" in row else "",
             _fmt(**row["test"]), _fmt(**row["test - dpo"], sign="+") if "test - dpo" in row else ""]
    lines.append(f"{policy:<28}" + "".join(f"{c:>30}" if i % 2 else f"{c:>28}" for i, c in enumerate(cells)))
  smallest = analysis["smallest_oracle_beating_dpo"]
  lines.append("")
  lines.append("smallest oracle setting beating DPO on validation (paired interval above 0): "
               + (f"{smallest} (test Δ {_fmt(**analysis['policies'][smallest]['test - dpo'], sign='+')})"
                  if smallest else "none of " + ", ".join(n for n, s in names.items() if s[0] == "oracle")))
  for source, name in analysis["validated"].items():
    row = analysis["policies"][name]
    line = f"{source} at its validated setting {name}: test Δ vs DPO {_fmt(**row['test - dpo'], sign='+')}"
    if source in analysis["share_of_ceiling"]:
      s = analysis["share_of_ceiling"][source]
      g = s["oracle_gain"]
      line += f"; share of the ceiling {s['share']:+.2f} "
      line += (f"[{s['low']:+.2f}, {s['high']:+.2f}]" if not s["unstable"] else
               f"[unbounded: {100 * s['undefined']:.0f}% of draws have no oracle gain]")
      line += f" (paired bootstrap over problems; oracle gain {_fmt(**g, sign='+')})"
    lines.append(line)
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The whole experiment (see the module docstring); writes workdir/results.json after every arm (`partial` until
  the last), so a run cut short still reports the settings it finished."""
  section = ceiling_section(config)
  wall, cpu = time.perf_counter(), time.process_time()
  # The stages run the trainer's, scorer's and sampler's configs: this program's own section stays out of them.
  config = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items() if k != "ceiling"})
  task = arith_experiment.ArithTask(config)
  if int(task.a.eval_prompts) <= int(section.val_prompts) + 1:  # before anything is sampled or trained
    raise errors.ConfigError(f"config.ceiling.val_prompts={section.val_prompts} leaves no test split of the "
                             f"{task.a.eval_prompts} held-out problems (arith.eval_prompts)")
  stages = stages_lib.Stages(workdir)
  prepared = task.prepare(config, stages)
  held_out = arith_experiment.read_jsonl(stages.path("problems/eval.jsonl"))
  # The reference's greedy responses first: their equations are every policy's dense-metric targets.
  greedy = task.evaluate(config, stages, prepared, dict(reference=prepared.reference))["policies"]
  records = arith_experiment.read_jsonl(stages.path(f"eval/reference/{generate.RECORDS}"))
  order = {r["prompt"][-1]["content"]: i for i, r in enumerate(held_out)}
  records.sort(key=lambda r: order[r["prompt"][-1]["content"]])  # the problems file's order: val first, then test
  targets = [len(result_targets(r["all_generated_responses"][0])) for r in records]
  # DPO on the oracle's scored cache: its loss reads only the reference log-probs, the same in every cache, and the
  # oracle's cache needs no contrastive pass (a sweep of the oracle alone scores nothing else).
  dpo = runner.arm_stage(config, task, prepared, stages, SOURCE_ARMS["oracle"])
  dpo.loss.update(dict(arms_lib.ARMS["dpo"].loss))
  policies = {"reference": prepared.reference, "dpo": train(config, task, prepared, stages, "dpo", dpo, "oracle")}
  per = {name: dense_stage(stages, name, path, prepared, records, section) for name, path in policies.items()}
  names: dict[str, tuple[str, float, str]] = {}

  def report(partial: bool) -> dict[str, Any]:  # results.json as it stands
    analysis = analyse(per, {n: names[n] for n in names if n in per}, int(section.val_prompts),
                       seed=int(config.seed), mean_alpha_scale=float(section.mean_alpha_scale))
    out = dict(partial=partial, analysis=analysis,
               settings={n: dict(source=s, alpha=a, normalization=m) for n, (s, a, m) in names.items()},
               targets=dict(total=int(sum(targets)), problems_with_targets=int(sum(t > 0 for t in targets)),
                            problems=len(targets)),
               table=table(analysis, {n: names[n] for n in names if n in per}), stage_seconds=stages.seconds(),
               greedy=greedy, stage_cpu_seconds=_cpu_seconds(stages),
               cpu_seconds=round(time.process_time() - cpu, 1), wall_seconds=round(time.perf_counter() - wall, 1))
    storage.write_json(os.path.join(workdir, "results.json"), out)
    return out

  def sweep(batch: dict[str, tuple[str, float, str]]) -> None:
    names.update(batch)
    for name in training_order(batch):
      source, alpha, norm = batch[name]
      stages.say(f"arm {name}")
      stage = arm_stage(config, task, prepared, stages, source, alpha, norm, int(section.arm_grad_accum_steps))
      policies[name] = train(config, task, prepared, stages, name, stage, source)
      per[name] = dense_stage(stages, name, policies[name], prepared, records, section)
      report(partial=True)

  # The oracle at every α and normalisation; the other sources sweep α at the normalisation the oracle validated.
  sweep(settings(section, ("oracle",)))
  chosen = report(partial=True)["analysis"]["validated"]["oracle"]
  others = tuple(s for s in section.sources if s != "oracle")
  if others:
    stages.say(f"the oracle's validated setting {chosen}: the other sources at its normalisation {names[chosen][2]}")
    sweep(settings(section, others, (names[chosen][2],)))
  if section.greedy:  # a generation pass per trained policy (the reference's is cached)
    greedy = task.evaluate(config, stages, prepared, policies)["policies"]
  out = report(partial=False)
  print("\n" + out["table"], flush=True)
  print(f"results: {os.path.join(workdir, 'results.json')}", flush=True)
  return out


def _cpu_seconds(stages) -> dict[str, float]:
  """CPU seconds (user + system of this program's process) of every finished stage that recorded them."""
  out = {}
  for name in stages.seconds():
    info = stages.info(name)
    if "cpu_seconds" in info:
      out[name] = info["cpu_seconds"]
  return out
