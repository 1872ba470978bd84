"""SmolLM2-135M-Instruct on arithmetic word problems: a task of the experiment runner with token-level ground truth.

    python -m tregjax.train --config configs/smollm2_arith.py[:tiny|:large]

Stages (each cached in the workdir; tregjax.experiments.runner does scoring, arms, token credit and the report):
  problems    seeded train / held-out splits of generated word problems (tregjax.tasks.arith), no problem in both
  reference   the SmolLM2 GGUF (`python -m tregjax.assets smollm2`, fetched here if absent) as a Hugging Face directory
  samples     `tregjax.generate`: `arith.num_samples` on-policy samples per training problem from the reference, the
              oracle's sequence reward (final answer right = 1) as the scorer, best/worst kept as the pair; groups whose
              samples all score the same give no pair (counted in samples/summary.json)
  eval/<p>    `tregjax.generate` again, greedy, one response per held-out problem for every policy p
The oracle's token truth (`token_labels`) marks the result of every explicit equation (and the final answer; none for
a sample the token budget cut, which has none) as correct or wrong; the oracle arm trains on it, and the token-credit
table measures every token-reward source against it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from tregjax import assets, config_schema, generate, models, storage
from tregjax.experiments import arms, report, runner, stats
from tregjax.experiments import stages as stages_lib
from tregjax.models import gguf
from tregjax.tasks import arith, sections


class ArithScorer:
  """generate's Python scorer: the oracle's sequence reward (1 when the final number stated is the answer)."""

  def __init__(self, answers: dict[str, int]):
    self.answers = answers

  def __call__(self, prompt_messages: list[dict[str, str]], response_text: str) -> float:
    return arith.sequence_reward(response_text, self.answers[prompt_messages[-1]["content"]])[0]


def _write_problems(problems: Sequence[arith.Problem], path: str) -> str:
  """The problems as a prompt file for `tregjax.generate` (the answer travels beside the prompt, for the oracle)."""
  lines = [json.dumps(dict(prompt=arith.prompt_messages(p), answer=p.answer, level=p.level, expression=p.expression))
           for p in problems]
  storage.write_bytes(path, "".join(line + "\n" for line in lines).encode("utf-8"))
  return path


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Every non-blank line of a JSON-lines file (the problems, generate's records), parsed."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class ArithTask:
  """Arithmetic word problems for `tregjax.experiments.runner` (see the module docstring)."""
  name = "smollm2-arith"
  section = "arith"
  # What names the oracle's labels in the scored cache's hash and the oracle arm's stage key (the runner's
  # score.token_reward.oracle_id). Code cannot be hashed: a change of the labels changes this id, so that a workdir
  # scored under the old labels is refused (StaleCacheError) instead of silently reused. "cut-answer" (#28): a sample
  # the model did not end itself has no final-answer label (arith.char_labels(finished=False)); the first id,
  # "smollm2-arith:token_labels", graded a cut response's last number as a wrong final answer.
  oracle_id = "smollm2-arith:token_labels:cut-answer"

  def __init__(self, config: ml_collections.ConfigDict):
    self.a = config_schema.merge("arith", sections.default_arith_config(), config.get("arith", None))
    self.answers: dict[str, int] = {}
    self.tokenizer_dir = ""
    self._tok = None
    # (question, response text) -> whether the model ended that sample itself (samples/records.jsonl all_finished)
    self.finished: dict[tuple[str, str], bool] = {}

  def read_finished(self, records: list[dict[str, Any]]) -> None:
    """Which sampled responses the model ended itself (generate's records: all_finished); a text sampled both ways
    counts as cut. The oracle labels only responses found here (`token_labels`)."""
    for record in records:
      question = record["prompt"][-1]["content"]
      for text, done in zip(record["all_generated_responses"], record["all_finished"]):
        key = (question, text.strip())
        self.finished[key] = self.finished.get(key, True) and bool(done)

  # ---------------------------------------------------------------------------------------------- stages

  def generate_config(self, config, prepared_reference: str, tokenizer: str, prompts: str, out: str, *,
                      num_samples: int, temperature: float, batch_size: int) -> ml_collections.ConfigDict:
    """A `tregjax.generate` stage config for this task: its sampler settings (max_new_tokens, top_p) on `prompts`."""
    stage = stages_lib.trainer_config(config, self.section)
    stage.model.hf_path = prepared_reference
    stage.data.tokenizer = tokenizer
    stage.data.max_prompt_length = int(config.data.max_prompt_length)
    # seed, dtype and progress_bar are the stage's config.seed, model.dtype and logging.progress_bar (their owners).
    stage.generate = ml_collections.ConfigDict(dict(
        prompt_files=[prompts], output_dir=out, num_samples=num_samples, temperature=temperature,
        top_p=float(self.a.top_p), max_new_tokens=int(self.a.max_new_tokens),
        batch_size=batch_size, buckets=(64, 128, 256), shard_size=max(batch_size // max(num_samples, 1), 1) * 4))
    return stage

  def prepare(self, config: ml_collections.ConfigDict, stages: stages_lib.Stages) -> stages_lib.Prepared:
    a = self.a
    train_file, eval_file = stages.path("problems/train.jsonl"), stages.path("problems/eval.jsonl")
    problems_key = dict(train=int(a.train_prompts), eval=int(a.eval_prompts), seed=int(a.seed), levels=list(a.levels),
                        max_operand=int(a.max_operand))
    if not stages.done("problems", problems_key):
      started = time.perf_counter()
      train, held_out = arith.make_splits(int(a.train_prompts), int(a.eval_prompts), int(a.seed), tuple(a.levels),
                                          max_operand=int(a.max_operand))
      os.makedirs(stages.path("problems"), exist_ok=True)
      _write_problems(train, train_file)
      _write_problems(held_out, eval_file)
      stages.finish("problems", started, dict(train=len(train), eval=len(held_out)), key=problems_key)
    for row in read_jsonl(train_file) + read_jsonl(eval_file):
      self.answers[row["prompt"][-1]["content"]] = int(row["answer"])

    reference = stages.path("reference/hf")
    reference_key = dict(model=a.model or "assets:smollm2")
    if not stages.done("reference", reference_key):
      started = time.perf_counter()
      self._export_reference(config, reference)
      stages.finish("reference", started, key=reference_key)
    self.tokenizer_dir = reference

    samples = stages.path("samples")
    started = time.perf_counter()
    # Always called: finished, current output returns at once; output of other inputs is refused (StaleCacheError).
    generate.run(self.generate_config(config, reference, reference, train_file, samples,
                                       num_samples=int(a.num_samples), temperature=float(a.temperature),
                                       batch_size=int(a.sample_batch_size)),
                 scorer=ArithScorer(self.answers))
    if not stages.done("samples"):
      with open(os.path.join(samples, generate.SUMMARY), encoding="utf-8") as f:
        summary = json.load(f)
      stages.finish("samples", started, {k: summary[k] for k in ("pairs", "all_equal", "samples", "new_tokens",
                                                                 "unfinished_samples")})
    self.read_finished(read_jsonl(os.path.join(samples, generate.RECORDS)))
    return stages_lib.Prepared(reference=reference, tokenizer=reference,
                               train_pairs=os.path.join(samples, "pairs.jsonl"),
                               data=dict(max_prompt_length=int(config.data.max_prompt_length),
                                         max_length=int(config.data.max_length), buckets=tuple(config.data.buckets)))

  def _export_reference(self, config, out: str) -> None:
    """The reference as a Hugging Face directory (float32 safetensors + tokenizer): every later stage loads it."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

    path = self.a.model or str(assets.fetch("smollm2"))
    if path.endswith(".gguf"):
      tok_dir = os.path.join(os.path.dirname(path), "tokenizer")
      tok = (AutoTokenizer.from_pretrained(tok_dir, local_files_only=True) if os.path.isdir(tok_dir)
             else gguf.tokenizer_from_gguf(path))
    else:
      tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = models.from_pretrained(path, dtype=jnp.float32)
    models.check_tokenizer_vocab(len(tok), model)
    models.save_pretrained(model, out, tokenizer=tok)

  # ---------------------------------------------------------------------------------------------- oracle

  def token_labels(self, prompt_messages: list[dict[str, str]], response_ids: Sequence[int]) -> np.ndarray:
    """The oracle's truth for exactly these ids (offsets of the tokenizer's own encoding; see arith.token_truth),
    for one of the sampled responses (`read_finished`): a response the token budget cut gets no final-answer label."""
    if self._tok is None:
      from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
      self._tok = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
    question = prompt_messages[-1]["content"]
    text = self._tok.decode([int(i) for i in response_ids], skip_special_tokens=True).strip()
    finished = self.finished.get((question, text))
    if finished is None and text and any(q == question and t.startswith(text) for q, t in self.finished):
      finished = False  # a sample the data pipeline truncated (data.max_length): cut as well, its end unseen
    if finished is None:
      raise RuntimeError(f"a scored response of {question!r} is none of the model's samples (records.jsonl): "
                         f"{text[:80]!r}")
    return np.asarray(arith.token_truth(self._tok, [int(i) for i in response_ids], self.answers[question],
                                        finished=finished), np.int8)

  # ------------------------------------------------------------------------------------------ evaluation

  def evaluate(self, config: ml_collections.ConfigDict, stages: stages_lib.Stages, prepared: stages_lib.Prepared,
               policies: dict[str, str]) -> dict[str, Any]:
    """Greedy answers of every policy to the held-out problems: accuracy (Wilson), paired Δ vs DPO, equation errors,
    parse failures and response length."""
    eval_file = stages.path("problems/eval.jsonl")
    per_policy: dict[str, dict[str, Any]] = {}
    correct: dict[str, np.ndarray] = {}
    for name, path in policies.items():
      out = stages.path(f"eval/{name}")
      started = time.perf_counter()
      generate.run(self.generate_config(config, path, prepared.tokenizer, eval_file, out, num_samples=1,
                                         temperature=0.0, batch_size=int(self.a.eval_batch_size)),
                   scorer=ArithScorer(self.answers))
      if not stages.done(f"eval/{name}"):
        stages.finish(f"eval/{name}", started)
      records = read_jsonl(os.path.join(out, generate.RECORDS))
      texts = [r["all_generated_responses"][0] for r in records]
      answers = [self.answers[r["prompt"][-1]["content"]] for r in records]
      rewards = [arith.sequence_reward(t, ans) for t, ans in zip(texts, answers)]
      correct[name] = np.array([r for r, _ in rewards], np.float64)
      k = int(correct[name].sum())
      acc, low, high = stats.wilson(k, len(records))
      wrong, equations = arith.equation_error_rate(texts)
      error_rate, error_low, error_high = stats.wilson(wrong, equations)  # nan when no equation was written
      lengths = [len(r["all_generated_ids"][0]) for r in records]
      per_policy[name] = dict(
          accuracy=acc, accuracy_low=low, accuracy_high=high, correct=k, problems=len(records),
          unparseable=sum(not ok for _, ok in rewards),
          equations=equations, wrong_equations=wrong,
          equation_error_rate=error_rate, equation_error_low=error_low, equation_error_high=error_high,
          mean_length=float(np.mean(lengths)), unfinished=sum(not r["all_finished"][0] for r in records))
    comparisons = {}
    if "dpo" in correct:
      for name in correct:
        if name != "dpo":
          comparisons[f"{name} - dpo"] = dict(zip(("mean", "low", "high"),
                                                  stats.paired_difference(correct[name], correct["dpo"])))
    lines = [f"{'policy':<38} {'accuracy':>9} {'95% interval':>16} {'Δ vs DPO [95%]':>24} {'eq. errors':>11} "
             f"{'unparsed':>9} {'length':>7}"]
    for name, r in per_policy.items():
      label = arms.label(name, "reference (SmolLM2-135M-Instruct)")
      c = comparisons.get(f"{name} - dpo")
      delta = f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" if c else ""
      interval = f"[{r['accuracy_low']:.3f}, {r['accuracy_high']:.3f}]"
      lines.append(f"{label:<38} {r['accuracy']:>9.3f} {interval:>16} "
                   f"{delta:>24} {runner.fmt(r['equation_error_rate'], '.3f'):>11} {r['unparseable']:>9} "
                   f"{r['mean_length']:>7.1f}")
    n = len(next(iter(correct.values()))) if correct else 0
    header = (f"greedy accuracy on {n} held-out problems (Wilson 95%); Δ vs DPO: paired difference on the same "
              f"problems (95%); eq. errors: the oracle's fraction of wrong equations in the policy's own responses; "
              f"length: mean response tokens.")
    notes = []
    if "dpo" in per_policy and "dpo_reg" in per_policy:
      c = comparisons["dpo_reg - dpo"]
      verdict = "beats" if c["low"] > 0 else ("is worse than" if c["high"] < 0 else "is not distinguishable from")
      notes.append(f"DPO-REG {verdict} DPO on held-out accuracy: {per_policy['dpo_reg']['accuracy']:.3f} vs "
                   f"{per_policy['dpo']['accuracy']:.3f} (paired Δ {c['mean']:+.3f} [{c['low']:+.3f}, "
                   f"{c['high']:+.3f}])")
    plot = [report.Estimate(arms.label(n_), r["accuracy"],
                            r["accuracy_low"], r["accuracy_high"]) for n_, r in per_policy.items()]
    return dict(policies=per_policy, comparisons=comparisons, table=header + "\n" + "\n".join(lines), notes=notes,
                plot=plot, plot_title="greedy accuracy, held-out problems",
                plot_reference=per_policy.get("reference", {}).get("accuracy"))
