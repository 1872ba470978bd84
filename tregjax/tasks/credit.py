"""Token credit across model sizes (#28): does T-REG's self-generated token reward improve as the model grows?

    python -m tregjax.train --config configs/credit_scaling.py[:tiny|:small]

For each model of `credit.models` (tregjax.assets names: SmolLM2-135M, Qwen2.5-Coder-0.5B, Qwen2.5-Coder-1.5B), on
the same generated arithmetic problems (tregjax.tasks.arith; the `arith` section, seeds included, is shared), in
`<workdir>/<model>/` (the experiment runner's stages and caches: a rerun resumes, a stage of other inputs is refused):
  problems, reference, samples   the arithmetic task's stages (tasks/arith_experiment.ArithTask.prepare): the model's
                 own samples (`arith.num_samples` per problem at `arith.temperature`)
  credit_pairs   EVERY sampled response, not only the best/worst of mixed groups: a problem's samples are paired
                 in order (1-2, 3-4, ...; identical texts skipped) so the scoring pass scores all of them
  scored/*       the runner's scoring stage per token-reward source that needs no training: T-REG contrastive with
                 the task's careful/careless system prompts ("contrastive"), with the T-REG paper's four-dimension
                 prompts (helpful, correct, coherent, concise vs unhelpful, incorrect, incoherent, verbose;
                 "paper/scored/contrastive"), the reference's confidence; the raw log π_ref and TIS-DPO's weights
                 come free with them
  greedy/<cond>  greedy answers to the held-out problems with no system prompt (the chat template's default), with
                 the better (careful) and with the worse (careless) system prompt
Reported per model: ROC-AUC of each source at ranking the oracle's correct tokens above its error tokens (bootstrap
95% over responses; runner.token_credit), the labelled-token counts, greedy accuracy per condition (Wilson 95%) and
the paired differences better − none (the self-teacher gap), worse − none; CPU and wall seconds. Across models:
results.json, a table, and plot.png (AUC of each source and the gap against parameter count).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from tregjax import assets, config_schema, errors, generate, storage
from tregjax.experiments import runner, stats
from tregjax.experiments import stages as stages_lib
from tregjax.models import gguf
from tregjax.tasks import arith, arith_experiment, sections

# The paper's four-dimension contrastive prompts are the scoring pass's defaults (config_schema).
PAPER_SOURCE = "contrastive_paper"
CONDITIONS = ("none", "better", "worse")
SOURCES = ("contrastive", PAPER_SOURCE, "confidence", "ref_logprob", "tisdpo_weight", "chance")
LABELS = {
    "contrastive": "T-REG contrastive, task prompts (careful vs careless)",
    PAPER_SOURCE: "T-REG contrastive, paper prompts (4 dimensions)",
    "confidence": "reference confidence (centred log π_ref)",
    "ref_logprob": "raw log π_ref(y_t)",
    "tisdpo_weight": "TIS-DPO weight (from the task-prompt δ_t)",
    "chance": "chance (random scores)",
}


def _section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return config_schema.merge("credit", sections.default_credit_config(), config.get("credit", None))


def budget(section: ml_collections.ConfigDict, name: str, default: int) -> int:
  """Model `name`'s response budget: its `credit.max_new_tokens` entry, else `default` (arith.max_new_tokens)."""
  found = default
  for entry in section.max_new_tokens:
    if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str)
        or isinstance(entry[1], bool) or not isinstance(entry[1], int) or entry[1] < 1):
      raise errors.ConfigError(f"config.credit.max_new_tokens: each entry must be (model name, positive int), got "
                               f"{entry!r}")
    if entry[0] == name:
      found = int(entry[1])
  return found


def _model_path(name: str) -> str:
  return name if name.endswith(".gguf") else str(assets.fetch(name, verbose=True))


def parameter_count(gguf_path: str) -> int:
  """Elements of every tensor in the GGUF (the weights the model runs with; a tied head counted once)."""
  reader = gguf.open_reader(gguf_path)  # the header only: tensors stay mapped
  return int(sum(int(t.n_elements) for t in reader.tensors))


def all_sample_pairs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Pairs that cover every sampled response of every problem (samples 1-2, 3-4, ...; an odd last one is paired with
  the first; identical texts skipped): the scoring pass scores both sides, so token credit sees all samples."""
  out = []
  for record in records:
    texts = list(record["all_generated_responses"])
    if len(texts) % 2:
      texts.append(texts[0])
    for a, b in zip(texts[0::2], texts[1::2]):
      if a != b and a.strip() and b.strip():
        out.append(dict(prompt=record["prompt"], chosen=a, rejected=b))
  return out


def _with_system(prompt_file: str, system: str | None, out: str) -> str:
  rows = arith_experiment.read_jsonl(prompt_file)
  lines = []
  for row in rows:
    messages = [m for m in row["prompt"] if m["role"] != "system"]
    row = dict(row, prompt=([{"role": "system", "content": system}] if system else []) + messages)
    lines.append(json.dumps(row))
  storage.write_bytes(out, "".join(line + "\n" for line in lines).encode("utf-8"))
  return out


class CreditModel:
  """One model's stages in `<workdir>/<name>/`: the arithmetic task's samples, then scoring, credit and greedy runs."""

  def __init__(self, config: ml_collections.ConfigDict, name: str, workdir: str):
    self.name = name
    section = _section(config)
    self.greedy_batch_size = int(section.greedy_batch_size)
    # The stages run the trainer's, scorer's and sampler's configs: this program's own section stays out of them.
    self.config = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items() if k != "credit"})
    self.path = _model_path(name)
    self.config.arith.model = self.path
    tokens = budget(section, name, int(self.config.arith.max_new_tokens))
    if tokens != int(self.config.arith.max_new_tokens):
      # The scoring pass must hold the longest prompt (the paper's system prompt) and a full-budget response (+ its
      # end-of-turn tokens): a longer budget widens the last bucket.
      self.config.arith.max_new_tokens = tokens
      length = max(int(self.config.data.max_length), int(self.config.data.max_prompt_length) + tokens + 8)
      self.config.data.max_length = length
      self.config.data.buckets = tuple(b for b in self.config.data.buckets if b < length) + (length,)
    self.task = arith_experiment.ArithTask(self.config)  # its oracle knows which samples were cut
    self.stages = stages_lib.Stages(os.path.join(workdir, name.replace("/", "_")))

  def _cpu(self, stage: str, fn: Callable[[], Any], done: str = "") -> Any:
    """fn(), its process CPU seconds (every thread) kept in cpu_seconds.json under `stage`, unless the stage had
    finished before (`done`, default `stage`: its DONE file existed): a reused stage costs only its checks, and the
    run that did the work recorded its own figure (a resumed run once overwrote 766 s of scoring with its 4 s)."""
    finished = os.path.exists(self.stages.path(os.path.join(done or stage, "DONE")))
    started = time.process_time()
    out = fn()
    spent = round(time.process_time() - started, 1)
    if not finished and spent >= 2.0:
      storage.write_json(self.stages.path("cpu_seconds.json"), dict(self.cpu_seconds(), **{stage: spent}))
    return out

  def cpu_seconds(self) -> dict[str, float]:
    """CPU seconds of every stage this model's runs did (see _cpu)."""
    path = self.stages.path("cpu_seconds.json")
    if not os.path.exists(path):
      return {}
    with open(path, encoding="utf-8") as f:
      return json.load(f)

  def run(self) -> dict[str, Any]:
    cpu, wall = time.process_time(), time.perf_counter()
    config, stages, task = self.config, self.stages, self.task
    os.makedirs(stages.root, exist_ok=True)
    # problems, reference and samples (their CPU together: the problems take none, a cached reference none).
    prepared = self._cpu("problems+reference+samples", lambda: task.prepare(config, stages), done="samples")
    pairs_file = stages.path("credit_pairs/pairs.jsonl")
    samples = os.path.join(os.path.dirname(prepared.train_pairs), generate.RECORDS)
    sample_records = arith_experiment.read_jsonl(samples)
    finished = [bool(f) for r in sample_records for f in r["all_finished"]]
    if not stages.done("credit_pairs", dict(samples=samples)):
      started = time.perf_counter()
      os.makedirs(os.path.dirname(pairs_file), exist_ok=True)
      pairs = all_sample_pairs(sample_records)
      if not pairs:
        raise ValueError(f"{samples}: no two distinct samples of any problem to score; raise arith.num_samples or "
                         f"arith.temperature")
      storage.write_bytes(pairs_file, "".join(json.dumps(p) + "\n" for p in pairs).encode("utf-8"))
      stages.finish("credit_pairs", started, dict(pairs=len(pairs)), key=dict(samples=samples))
    prepared = dataclasses.replace(prepared, train_pairs=pairs_file)

    caches = {source: self._cpu(f"scored/{source}",
                                lambda source=source: runner.score_stage(config, task, prepared, stages, source))
              for source in ("contrastive", "confidence")}
    # Greedy before the paper's prompts: on a shared CPU the self-teacher gap is worth more than the fourth source.
    greedy = self.greedy(prepared)
    # The paper's prompts: the same scoring stage in a sub-workdir (its own dataset and cache), default instructions.
    paper = ml_collections.ConfigDict(config.to_dict())
    paper.score.better_instruction = config_schema.BETTER_INSTRUCTION
    paper.score.worse_instruction = config_schema.WORSE_INSTRUCTION
    caches[PAPER_SOURCE] = self._cpu("paper/scored/contrastive", lambda: runner.score_stage(
        paper, task, prepared, stages_lib.Stages(stages.path("paper")), "contrastive"))
    credit, truth, rows = runner.token_credit(task, caches, seed=int(config.seed))
    # The scores behind each AUC, kept for the comparison across sizes (`size_differences`).
    self.scores = dict(labels=truth["labels"], groups=truth["groups"], sources={
        source: runner.flat_rewards(rows if source == "contrastive" else runner.cache_rows(cache))
        for source, cache in caches.items()})
    self.scores["sources"]["ref_logprob"] = np.concatenate(
        [np.asarray(row[f"ref_{side}_token_logps"], np.float32) for row in rows for side in ("chosen", "rejected")])
    return dict(model=self.name, file=self.path, parameters=parameter_count(self.path), token_credit=credit,
                greedy=greedy, max_new_tokens=int(config.arith.max_new_tokens),
                samples=dict(finished=sum(finished), samples=len(finished)),
                cpu_seconds=round(time.process_time() - cpu, 1), wall_seconds=round(time.perf_counter() - wall, 1),
                stage_seconds=stages.seconds(), stage_cpu_seconds=self.cpu_seconds())

  def greedy(self, prepared: stages_lib.Prepared) -> dict[str, Any]:
    """Greedy accuracy on the held-out problems per system-prompt condition, and the paired differences."""
    config, stages, task = self.config, self.stages, self.task
    systems = {"none": None, "better": str(config.score.better_instruction),
               "worse": str(config.score.worse_instruction)}
    correct: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {}
    for condition in CONDITIONS:
      os.makedirs(stages.path("greedy"), exist_ok=True)
      prompts = _with_system(stages.path("problems/eval.jsonl"), systems[condition],
                             stages.path(f"greedy/{condition}.jsonl"))
      target = stages.path(f"greedy/{condition}")
      started = time.perf_counter()
      # The task's own sampler settings (max_new_tokens, top_p, buckets), greedy, one answer per problem.
      stage = task.generate_config(
          config, prepared.reference, prepared.tokenizer, prompts, target, num_samples=1, temperature=0.0,
          batch_size=int(self.greedy_batch_size))
      self._cpu(f"greedy/{condition}", lambda: generate.run(stage, scorer=arith_experiment.ArithScorer(task.answers)))
      if not stages.done(f"greedy/{condition}"):
        stages.finish(f"greedy/{condition}", started)
      records = arith_experiment.read_jsonl(os.path.join(target, generate.RECORDS))
      records.sort(key=lambda r: r["prompt"][-1]["content"])  # the same problem order in every condition
      rewards = [arith.sequence_reward(r["all_generated_responses"][0], task.answers[r["prompt"][-1]["content"]])
                 for r in records]
      correct[condition] = np.array([r for r, _ in rewards], np.float64)
      acc, low, high = stats.wilson(int(correct[condition].sum()), len(records))
      wrong, equations = arith.equation_error_rate([r["all_generated_responses"][0] for r in records])
      out[condition] = dict(accuracy=acc, low=low, high=high, correct=int(correct[condition].sum()),
                            problems=len(records), unparseable=sum(not ok for _, ok in rewards),
                            wrong_equations=wrong, equations=equations,
                            finished=sum(bool(r["all_finished"][0]) for r in records))
    for a, b in (("better", "none"), ("worse", "none"), ("better", "worse")):
      out[f"{a} - {b}"] = dict(zip(("mean", "low", "high"), stats.paired_difference(correct[a], correct[b])))
    return out


# ------------------------------------------------------------------------------------------------- report


def auc_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray], *, seed: int = 0, resamples: int = 1000
                   ) -> tuple[float, float, float]:
  """(AUC of b − AUC of a, 95% low, high): two models' token-credit AUCs on their own (independent) responses, the
  interval a percentile bootstrap that resamples each model's responses independently. `a`, `b`: dict(scores,
  labels, groups) as runner.token_credit's (label 0 ignored)."""
  def prepared(x):
    keep = np.asarray(x["labels"]) != 0
    scores, labels, groups = (np.asarray(x[k])[keep] for k in ("scores", "labels", "groups"))
    _, index = np.unique(groups, return_inverse=True)
    return scores, labels, [np.flatnonzero(index == g) for g in range(index.max() + 1)]

  def auc(scores, labels):
    return stats.auc(scores[labels > 0], scores[labels < 0])

  (sa, la, ma), (sb, lb, mb) = prepared(a), prepared(b)
  point = auc(sb, lb) - auc(sa, la)
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(resamples):
    ta = np.concatenate([ma[g] for g in rng.integers(0, len(ma), len(ma))])
    tb = np.concatenate([mb[g] for g in rng.integers(0, len(mb), len(mb))])
    d = auc(sb[tb], lb[tb]) - auc(sa[ta], la[ta])
    if not np.isnan(d):
      draws.append(d)
  low, high = np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
  return float(point), float(low), float(high)


SIZE_SOURCES = ("contrastive", PAPER_SOURCE, "confidence", "ref_logprob")


def size_differences(models: list[tuple[dict[str, Any], dict[str, Any]]], seed: int = 0) -> dict[str, Any]:
  """AUC(larger) − AUC(smaller) for each consecutive pair of models by parameter count and each source of
  SIZE_SOURCES (`auc_difference`). `models`: (result, scores) per model, scores as CreditModel.scores."""
  order = sorted(models, key=lambda m: m[0]["parameters"])
  out = {}
  for (ra, sa), (rb, sb) in zip(order, order[1:]):
    out[f"{rb['model']} - {ra['model']}"] = {
        source: dict(zip(("mean", "low", "high"), auc_difference(
            dict(scores=sa["sources"][source], labels=sa["labels"], groups=sa["groups"]),
            dict(scores=sb["sources"][source], labels=sb["labels"], groups=sb["groups"]), seed=seed)))
        for source in SIZE_SOURCES}
  return out


def table(results: list[dict[str, Any]]) -> str:
  """Token credit (AUC [95%]) per model and source, labelled tokens, greedy accuracy and the self-teacher gap."""
  def f(r: dict[str, Any]) -> str:
    return f"{runner.fmt(r['auc'], '.3f')} [{runner.fmt(r['low'], '.3f')}, {runner.fmt(r['high'], '.3f')}]"

  lines = ["token-credit ROC-AUC (95% bootstrap over responses) of each source at ranking the oracle's correct "
           "tokens above its error tokens, on each model's own samples:",
           f"{'source':<52}" + "".join(f"{r['model']:>26}" for r in results)]
  for source in SOURCES:
    lines.append(f"{LABELS[source]:<52}" + "".join(f"{f(r['token_credit']['sources'][source]):>26}" for r in results))
  counts = lambda c: f"{c['correct_tokens']}+ / {c['error_tokens']}- / {c['responses']} resp."  # noqa: E731
  lines.append(f"{'labelled tokens (correct / error / responses)':<52}"
               + "".join(f"{counts(r['token_credit']['counts']):>26}" for r in results))
  lines.append(f"{'samples ended by the model within the budget':<52}" + "".join(
      f"{r['samples']['finished']} / {r['samples']['samples']} ({r['max_new_tokens']} tokens)".rjust(26)
      for r in results))
  lines.append("")
  lines.append("greedy accuracy on the held-out problems (Wilson 95%) and paired differences (95%):")
  lines.append(f"{'condition':<52}" + "".join(f"{r['model']:>26}" for r in results))
  for key in CONDITIONS:
    lines.append(f"{'system prompt: ' + key:<52}" + "".join(
        f"{r['greedy'][key]['accuracy']:.3f} [{r['greedy'][key]['low']:.3f}, {r['greedy'][key]['high']:.3f}]"
        .rjust(26) for r in results))
  for key in ("better - none", "worse - none"):
    label = "self-teacher gap: better − none" if key == "better - none" else "worse − none"
    lines.append(f"{label:<52}" + "".join(
        f"{r['greedy'][key]['mean']:+.3f} [{r['greedy'][key]['low']:+.3f}, {r['greedy'][key]['high']:+.3f}]"
        .rjust(26) for r in results))
  lines.append(f"{'greedy answers ended within the budget (none/better/worse)':<52}" + "".join(
      "/".join(str(r["greedy"][c]["finished"]) for c in CONDITIONS).rjust(26) for r in results))
  lines.append(f"{'parameters':<52}" + "".join(f"{r['parameters'] / 1e6:>25.0f}M" for r in results))
  lines.append(f"{'CPU seconds (this run) / wall seconds':<52}"
               + "".join(f"{r['cpu_seconds']:.0f} / {r['wall_seconds']:.0f}".rjust(26) for r in results))
  return "\n".join(lines)


def plot(path: str, results: list[dict[str, Any]]) -> str:
  """AUC of every source and the self-teacher gap against parameter count (log scale), with 95% intervals."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  order = sorted(results, key=lambda r: r["parameters"])
  x = np.array([r["parameters"] for r in order], np.float64)
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
  try:
    for k, source in enumerate(SOURCES):
      rows = [r["token_credit"]["sources"][source] for r in order]
      y = np.array([r["auc"] if r["auc"] is not None else np.nan for r in rows], np.float64)
      err = np.array([[yy - (r["low"] or yy), (r["high"] or yy) - yy] for yy, r in zip(y, rows)]).T
      left.errorbar(x * (1 + 0.025 * (k - 2.5)), y, yerr=err, marker="o", capsize=3, label=LABELS[source])
    left.axhline(0.5, color="grey", ls="--", lw=0.8)
    left.set(xscale="log", xlabel="parameters", ylabel="token-credit ROC-AUC", title="token credit vs model size")
    left.legend(fontsize=7)
    for key, label in (("better - none", "better − none (self-teacher gap)"), ("worse - none", "worse − none")):
      g = [r["greedy"][key] for r in order]
      y = np.array([d["mean"] for d in g])
      err = np.array([[d["mean"] - d["low"], d["high"] - d["mean"]] for d in g]).T
      right.errorbar(x, y, yerr=np.nan_to_num(err), marker="o", capsize=3, label=label)
    right.axhline(0.0, color="grey", ls="--", lw=0.8)
    right.set(xscale="log", xlabel="parameters", ylabel="greedy accuracy difference (paired)",
              title="system-prompt effect on greedy accuracy")
    right.legend(fontsize=8)
    for ax in (left, right):  # one labelled tick per model, no log-scale minor labels
      ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
      ax.set_xticks(x, [f"{r['model']}\n{r['parameters'] / 1e6:.0f}M" for r in order], fontsize=7)
      ax.set_xlim(x.min() / 1.5, x.max() * 1.5)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
  finally:
    plt.close(fig)
  storage.write_bytes(path, buf.getvalue())
  return path


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Every model of `credit.models`, then results.json, the table and plot.png in `workdir`."""
  section = _section(config)
  os.makedirs(workdir, exist_ok=True)
  results, scores = [], []
  for name in section.models:
    print(f"[credit] {name}", flush=True)
    model = CreditModel(config, name, workdir)
    results.append(model.run())
    scores.append(model.scores)
    print(f"[credit] {name}: {results[-1]['cpu_seconds']:.0f} CPU s, {results[-1]['wall_seconds']:.0f} s wall",
          flush=True)
  differences = size_differences(list(zip(results, scores)), seed=int(config.seed))
  text = table(results)
  if differences:
    text += "\n\ntoken-credit AUC across sizes, larger − smaller (95% bootstrap, each model's responses resampled):"
    for pair, row in differences.items():
      text += f"\n{pair}: " + "; ".join(f"{source} {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                                         for source, d in row.items())
  out = dict(models=results, size_differences=differences, table=text,
             plot=plot(os.path.join(workdir, "plot.png"), results))
  storage.write_json(os.path.join(workdir, "results.json"), out)
  print("\n" + text, flush=True)
  print(f"results: {os.path.join(workdir, 'results.json')}, plot: {out['plot']}", flush=True)
  return out
