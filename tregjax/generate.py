"""On-policy pairs: n samples per prompt from the policy, each scored by a reward model, best and worst kept.

    python -m tregjax.generate --config configs/x.py [--config.generate.num_samples=5 ...]

T-REG's data is on-policy (5 samples per prompt from the reference policy, scored by a sequence reward model, the best
and the worst kept as the pair). This module runs that pipeline on the same mesh as the rest of tregjax:

  prompts      local JSONL / parquet / `save_to_disk` files (`generate.prompt_files`) read by `tregjax.data.sources`;
               the prompt is the `data.fields.prompt` field (a string or chat messages), rendered with the local
               tokenizer's chat template and the generation prompt (`tregjax.data.tokenize.ChatTokenizer`).
  sampling     the KV-cache sampler of `tregjax.models.decoding` (temperature / top-p / top-k, `max_new_tokens`, one
               seed); rows = (prompt, sample) pairs in fixed-size batches sharded data-parallel over the mesh, prompts
               padded to a few bucket widths so jit compiles a bounded number of shapes; each row stops at its EOS;
               a prompt's n samples share one prefill, and finished rows leave the batch (`decoding.generate`;
               continuous batching is there as an option, `decoding.REFILL`).
  scoring      a sequence reward model (`generate.reward_model`, an HF *ForSequenceClassification directory loaded
               with `tregjax.models.from_pretrained`) read at the last token of prompt ids + response ids, or a Python
               callable `scorer(prompt_messages, response_text) -> float` (`run(..., scorer=)` or
               `generate.scorer="pkg.module:function"`), e.g. a synthetic world's oracle.
  output       `records.jsonl`: schema (c) of the data pipeline (`prompt`, `all_generated_responses`,
               `all_rm_scores`, plus the exact generated ids and whether each sample ended with EOS);
               `pairs.jsonl`: schema (a) (`prompt`, `chosen`, `rejected`), binarized by the data pipeline's own
               ranked-schema rule (`tregjax.data.schema.to_example`: first maximum vs first minimum, all-equal groups
               skipped), ready for `tregjax.data.build_dataset` + `python -m tregjax.score`;
               `summary.json`: counts (ties, all-equal groups, unfinished samples, ...), written last.

Resumable like the scoring pass (`tregjax.jobs`): prompts are cut into work shards (`generate.shard_size` prompts
each, one atomic file per shard); a rerun skips finished shards. Each row's sampling key is derived from (seed,
shard, its index in the shard), and a shard's batches are a pure function of its prompts and the config, so a resumed
run writes byte-identical output.
"""

from __future__ import annotations

from tregjax import cli  # first (standard library only): the command hooks below precede any third-party import

if __name__ == "__main__":  # the host allocator (may re-execute), one line for a missing package
  cli.install_command_hooks("python -m tregjax.generate")

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tregjax import config_schema, errors, jobs, models, parallel, programs, storage
from tregjax.data import hashing, schema, sources
from tregjax.data import build as data_build
from tregjax.data.pipeline import bucket_of
from tregjax.data.tokenize import ChatTokenizer
from tregjax.models import decoding

log = logging.getLogger("tregjax.generate")

OUTPUT_FORMAT_VERSION = 2  # 2: per-row sampling keys (#30)
RECORDS, PAIRS, SUMMARY = "records.jsonl", "pairs.jsonl", "summary.json"
Scorer = Callable[[list[dict[str, str]], str], float]


def default_generate_config() -> ml_collections.ConfigDict:
  """The `generate` section: every key this module reads, with its default (config_schema.generate_defaults; any
  config may carry it)."""
  return config_schema.generate_defaults()


def generate_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.generate` over the defaults, validated (a bad value fails before any model is loaded), with every key a
  command section shares resolved (config_schema.INHERITED: buckets, seed, dtype, progress_bar); an unknown key is a
  ConfigError naming it and the closest known one."""
  return config_schema.section(config, "generate")


# ------------------------------------------------------------------------------------------------ prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt: where it came from, its chat messages and their template-rendered ids."""
  where: str
  messages: tuple[dict[str, str], ...]
  ids: tuple[int, ...]


def load_prompts(config: ml_collections.ConfigDict, tok: ChatTokenizer,
                 counts: dict[str, Any] | None = None) -> list[Prompt]:
  """Every prompt of `generate.prompt_files`, in file order.

  A bad record (unreadable line, missing or malformed prompt field, over-long prompt under truncation="error") raises
  `DataError` naming its file, line and field, or is skipped and counted when `data.on_bad_record == "skip"`.
  """
  g, d = generate_section(config), data_build.data_section(config)
  if not g.prompt_files:
    raise ValueError("set generate.prompt_files (local JSONL / parquet / save_to_disk prompt files)")
  if d.on_bad_record not in ("error", "skip"):
    raise ValueError(f"data.on_bad_record must be 'error' or 'skip', got {d.on_bad_record!r}")
  field = dict(schema.DEFAULT_FIELDS, **dict(d.fields))["prompt"]
  limit = int(g.max_prompt_length or d.max_prompt_length)
  counts = counts if counts is not None else {}
  counts.update(records=0, truncated_prompts=0, dropped_too_long=0, bad_records={}, bad_record_examples=[])
  out = []
  for raw in sources.read_all(list(g.prompt_files), d.format):
    counts["records"] += 1
    try:
      if raw.error is not None:
        raise raw.error
      # The data pipeline's own prompt parsing (schema (a)/(c) `prompt`: a string or chat messages).
      messages = schema.prompt_messages(raw.value, field, raw.where)
      if d.system_prompt and messages[0]["role"] != "system":
        messages = ({"role": "system", "content": d.system_prompt},) + messages
      ids = tok.prompt_ids(messages)
      if len(ids) > limit:
        if d.truncation == "error":
          raise sources.DataError(raw.where, field, f"prompt has {len(ids)} tokens, longer than the budget "
                                  f"max_prompt_length={limit}", "prompt_too_long")
        if d.truncation == "drop":
          counts["dropped_too_long"] += 1
          continue
        ids = ids[-limit:]
        counts["truncated_prompts"] += 1
    except sources.DataError as err:
      if d.on_bad_record == "error":
        raise
      data_build.count_bad(counts, err)
      continue
    out.append(Prompt(raw.where, messages, tuple(ids)))
  counts["examples"] = len(out)
  files = [str(f) for f in g.prompt_files]
  data_build.report(f"prompts of {', '.join(files)}", counts)
  data_build.check_usable("prompts", files, counts, float(d.max_bad_fraction))
  return out


def check_lengths(prompts: Sequence[Prompt], max_new_tokens: int, limit: int, model_path: str) -> None:
  """Refuse, before anything compiles, a prompt that with `max_new_tokens` would run past the policy's
  max_position_embeddings (positions the model never saw), naming the longest prompt and the keys to lower."""
  longest = max(prompts, key=lambda p: len(p.ids))
  if len(longest.ids) + max_new_tokens > limit:
    raise errors.ConfigError(f"{longest.where}: prompt of {len(longest.ids)} tokens + generate.max_new_tokens="
                             f"{max_new_tokens} runs past max_position_embeddings={limit} of {model_path}; lower "
                             f"generate.max_prompt_length (data.truncation='truncate' cuts) or generate.max_new_tokens")


# ----------------------------------------------------------------------------------------------- models


def resolve_scorer(g: ml_collections.ConfigDict, scorer: Scorer | None) -> tuple[Scorer | None, str]:
  """(the Python scorer or None for the reward model, an identity string that goes into the output hash)."""
  if g.reward_model:
    if scorer is not None:
      raise ValueError("pass either a scorer or generate.reward_model, not both")
    return None, "reward_model:" + hashing.model_hash(g.reward_model)
  if scorer is None and g.scorer:
    scorer = programs.load(g.scorer, "generate.scorer")
  if scorer is None:
    raise ValueError("no scorer: set generate.reward_model (a local reward-model directory), generate.scorer "
                     "('pkg.module:function'), or pass scorer= to tregjax.generate.run")
  # Code cannot be hashed; the scorer's name stands for it (a callable object is named by its class).
  named = scorer if hasattr(scorer, "__qualname__") else type(scorer)
  return scorer, f"python:{named.__module__}:{named.__qualname__}"


class Sampler:
  """The policy on the mesh and a fixed batch shape; `sample` turns prompt rows into responses."""

  def __init__(self, config: ml_collections.ConfigDict, g: ml_collections.ConfigDict, mesh, tok: ChatTokenizer):
    self.g, self.mesh, self.pad_id = g, mesh, tok.pad_id
    dtype = jnp.dtype(cli.compute_dtype(config, g))
    path = config_schema.model_path(config, "policy")
    self.model = models.from_pretrained(path, dtype=dtype, param_dtype=dtype, mesh=mesh)
    if not isinstance(self.model, models.CausalLM):
      raise ValueError(f"model.hf_path={path} is not a causal LM (it has a classification head)")
    models.check_tokenizer_vocab(tok.vocab_size, self.model)
    eos = {tok.end_of_turn_id}
    if tok.tokenizer.eos_token_id is not None:
      eos.add(int(tok.tokenizer.eos_token_id))
    self.eos_ids = tuple(sorted(eos))
    self.batch_size = round_to_mesh(g.batch_size, mesh)

  def fit_batch(self, prompts: Sequence[Prompt], shard_rows: int) -> None:
    """generate.batch_size = 0: the batch from free memory and a short decode-step probe (at the longest prompt's
    bucket + max_new_tokens, at most one shard's rows), logged."""
    if self.g.batch_size:
      return
    width = bucket_of(max(len(p.ids) for p in prompts), self.g.buckets, extend=True)
    with parallel.use_mesh(self.mesh):
      self.batch_size, rates = decoding.choose_batch_size(
          self.model, width + int(self.g.max_new_tokens), max_rows=shard_rows,
          multiple=self.mesh.shape["data"] * self.mesh.shape["fsdp"])
    log.info("generate.batch_size=0: %d rows (probed rows/s: %s)", self.batch_size,
             ", ".join(f"{k}: {v:.0f}" for k, v in rates.items()) or "not probed")

  def sample(self, rows: Sequence[Sequence[int]], key: jax.Array, row_ids: Sequence[int]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Prompt rows (all in one bucket) -> (tokens i32[n, max_new_tokens], lengths i32[n]).

    batch_size rows decode at once, in batches one after another (`decoding.generate`: continuous batching when
    `decoding.REFILL`). Row i
    samples with fold_in(key, row_ids[i]) (its samples do not depend on its batch or on when it was admitted);
    equal prompts admitted together are prefilled once (`decoding.generate`)."""
    width = bucket_of(max(len(r) for r in rows), self.g.buckets, extend=True)
    with parallel.use_mesh(self.mesh):
      out = decoding.generate(self.model, rows, max_new_tokens=int(self.g.max_new_tokens), key=key,
                              temperature=float(self.g.temperature), top_p=float(self.g.top_p),
                              top_k=int(self.g.top_k), eos_ids=self.eos_ids, pad_id=self.pad_id,
                              prompt_multiple=width, row_ids=row_ids, batch_size=self.batch_size,
                              batch_multiple=self.mesh.shape["data"] * self.mesh.shape["fsdp"])
    tokens, lengths = jax.device_get((out.tokens, out.lengths))
    return np.asarray(tokens), np.asarray(lengths)


class RewardScorer:
  """A sequence reward model read at the last token of prompt ids + response ids, in bucketed fixed-size batches."""

  def __init__(self, config: ml_collections.ConfigDict, g: ml_collections.ConfigDict, mesh, tok: ChatTokenizer):
    self.g, self.mesh, self.pad_id = g, mesh, tok.pad_id
    dtype = jnp.dtype(cli.compute_dtype(config, g))
    model = models.from_pretrained(g.reward_model, dtype=dtype, param_dtype=dtype, mesh=mesh)
    if not isinstance(model, models.RewardModel):
      raise ValueError(f"generate.reward_model={g.reward_model} is not a sequence reward model "
                       f"(*ForSequenceClassification with num_labels=1)")
    if model.config.num_labels != 1:
      raise ValueError(f"generate.reward_model={g.reward_model} has num_labels={model.config.num_labels}; "
                       f"a sequence reward needs exactly one")
    _check_same_vocab(g.reward_model, tok)
    models.check_tokenizer_vocab(tok.vocab_size, model)
    self.batch_size = round_to_mesh(g.reward_batch_size, mesh)
    graphdef, self.state = nnx.split(model)

    def fn(state, tokens, segment_ids):
      return nnx.merge(graphdef, state).sequence_scores(tokens, segment_ids=segment_ids)

    self._fn = jax.jit(fn, in_shardings=(parallel.state_shardings(self.state, mesh), parallel.batch_sharding(mesh),
                                         parallel.batch_sharding(mesh)))
    self._buckets = tuple(sorted({bucket_of(b + g.max_new_tokens, g.buckets, extend=True) for b in g.buckets}))

  def __call__(self, sequences: Sequence[Sequence[int]]) -> list[float]:
    lengths = [len(s) for s in sequences]
    order = sorted(range(len(sequences)), key=lambda i: (bucket_of(lengths[i], self._buckets, extend=True), i))
    out = [0.0] * len(sequences)
    start = 0
    while start < len(order):
      t = bucket_of(lengths[order[start]], self._buckets, extend=True)
      chunk = [i for i in order[start:start + self.batch_size]
               if bucket_of(lengths[i], self._buckets, extend=True) == t]
      start += len(chunk)
      tokens = np.full((self.batch_size, t), self.pad_id, np.int32)
      segs = np.zeros((self.batch_size, t), np.int32)
      segs[len(chunk):, 0] = 1  # dummy rows: one token, so no row is all padding
      for row, i in enumerate(chunk):
        tokens[row, :lengths[i]] = sequences[i]
        segs[row, :lengths[i]] = 1
      with parallel.use_mesh(self.mesh):  # traced here: the model's activation sharding constraints need the mesh
        scores = np.asarray(jax.device_get(self._fn(self.state, tokens, segs)), np.float32)
      for row, i in enumerate(chunk):
        out[i] = float(scores[row])
    return out


def _check_same_vocab(path: str, tok: ChatTokenizer) -> None:
  """Reward-model scores are read on the policy's ids, so a reward model with its own tokenizer must share the vocab."""
  try:
    hashing.tokenizer_hash(path)
  except FileNotFoundError:
    return  # no tokenizer files beside the weights: nothing to compare
  import transformers  # pylint: disable=g-import-not-at-top
  theirs = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True).get_vocab()
  if theirs != tok.tokenizer.get_vocab():
    raise ValueError(f"generate.reward_model={path} has a different tokenizer vocabulary than the policy's "
                     f"({tok.path}); it scores the policy's token ids, so both must share one tokenizer")


def round_to_mesh(size: int, mesh) -> int:
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  return -(-int(size) // ways) * ways


# ------------------------------------------------------------------------------------------ one shard


def _shard_key(seed: int, shard: int) -> jax.Array:
  """The shard's sampling key; row r of the shard samples with fold_in(it, r) (decoding.row_keys)."""
  return jax.random.fold_in(jax.random.key(seed), shard)


def generate_shard(sampler: Sampler, prompts: Sequence[Prompt], shard: int, g: ml_collections.ConfigDict,
                   eos_ids: Sequence[int]) -> list[list[tuple[list[int], bool]]]:
  """Responses [prompt][sample] = (generated ids incl. EOS, ended with EOS) for one shard.

  Rows (prompt, sample) are grouped by prompt bucket, one `Sampler.sample` call (batch_size slots) per bucket, in
  row order; row r (= prompt * n + sample) samples with key fold_in(_shard_key(seed, shard),
  r), whatever slot it lands in and whenever.
  """
  n = int(g.num_samples)
  rows = [(p, j) for p in range(len(prompts)) for j in range(n)]
  width = [bucket_of(len(prompts[p].ids), g.buckets, extend=True) for p, _ in rows]
  out: list[list[Any]] = [[None] * n for _ in prompts]
  for w in sorted(set(width)):
    chunk = [r for r in range(len(rows)) if width[r] == w]
    tokens, lengths = sampler.sample([prompts[rows[r][0]].ids for r in chunk], _shard_key(int(g.seed), shard), chunk)
    for k, r in enumerate(chunk):
      ids = tokens[k, :lengths[k]].tolist()
      p, j = rows[r]
      out[p][j] = (ids, bool(ids) and ids[-1] in eos_ids)
  return out


def shard_records(prompts: Sequence[Prompt], responses: list[list[tuple[list[int], bool]]], scores: list[list[float]],
                  tok: ChatTokenizer, eos_ids: Sequence[int]) -> list[dict[str, Any]]:
  """Schema (c) records (+ exact ids, finished flags, the source location) for one shard."""
  records = []
  for prompt, resp, sc in zip(prompts, responses, scores):
    records.append(dict(
        prompt=list(prompt.messages),
        all_generated_responses=[response_text(tok, ids, eos_ids) for ids, _ in resp],
        all_rm_scores=[float(s) for s in sc],
        all_generated_ids=[ids for ids, _ in resp],
        all_finished=[fin for _, fin in resp],
        prompt_ids=list(prompt.ids),
        source=prompt.where))
  return records


def response_text(tok: ChatTokenizer, ids: Sequence[int], eos_ids: Sequence[int]) -> str:
  """The response's text: its ids without the final EOS, decoded without special tokens."""
  if ids and ids[-1] in eos_ids:
    ids = ids[:-1]
  return tok.tokenizer.decode(list(ids), skip_special_tokens=True)


def score_shard(prompts: Sequence[Prompt], texts: list[list[str]], responses: list[list[tuple[list[int], bool]]],
                reward: RewardScorer | None, scorer: Scorer | None) -> list[list[float]]:
  """Scores [prompt][sample] from the reward model (on prompt + response ids) or the Python scorer (on text)."""
  if reward is not None:
    flat = [list(p.ids) + ids for p, resp in zip(prompts, responses) for ids, _ in resp]
    values = reward(flat)
  else:
    values = []
    for p, txts in zip(prompts, texts):
      for j, text in enumerate(txts):
        v = scorer(list(p.messages), text)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
          raise ValueError(f"scorer returned {v!r} for sample {j} of the prompt at {p.where}; it must return a "
                           f"finite number")
        values.append(float(v))
  n = len(responses[0]) if responses else 0
  return [values[i * n:(i + 1) * n] for i in range(len(prompts))]


# ------------------------------------------------------------------------------------------ binarization


def binarize(records: Sequence[dict[str, Any]], where: Callable[[int], str]
             ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Schema (a) pairs from schema (c) records with the data pipeline's own rule, and the counts of what was skipped.

  The rule is `tregjax.data.schema.to_example(..., "ranked")`: chosen = first maximum, rejected = first minimum; an
  all-equal group (max == min) is a tie and skipped; identical chosen/rejected texts or an empty best/worst response
  are skipped and counted by kind. `tied_best`/`tied_worst` count groups whose maximum/minimum is not unique.
  """
  pairs: list[dict[str, Any]] = []
  counts: dict[str, Any] = dict(groups=len(records), pairs=0, all_equal=0, tied_best=0, tied_worst=0, skipped={},
                                skipped_examples=[])
  for i, rec in enumerate(records):
    scores = rec["all_rm_scores"]
    counts["tied_best"] += scores.count(max(scores)) > 1
    counts["tied_worst"] += scores.count(min(scores)) > 1
    try:
      ex = schema.to_example(rec, where(i), "ranked")
    except schema.Tie:
      counts["all_equal"] += 1
      continue
    except sources.DataError as err:
      counts["skipped"][err.kind] = counts["skipped"].get(err.kind, 0) + 1
      if len(counts["skipped_examples"]) < 10:
        counts["skipped_examples"].append(str(err))
      continue
    pairs.append(dict(prompt=list(ex.prompt), chosen=ex.chosen, rejected=ex.rejected, source=rec.get("source", "")))
  counts["pairs"] = len(pairs)
  return pairs, counts


# ------------------------------------------------------------------------------------------ work shards


def output_components(config: ml_collections.ConfigDict, g: ml_collections.ConfigDict, scorer_id: str,
                      batch_size: int) -> dict[str, str]:
  """Hashes of every input the output depends on (the effective batch size too: it decides the batches' keys)."""
  d = data_build.data_section(config)
  prompt_cfg = dict(format=d.format, field=dict(schema.DEFAULT_FIELDS, **dict(d.fields))["prompt"],
                    system_prompt=d.system_prompt, end_of_turn_token=d.end_of_turn_token,
                    max_prompt_length=int(g.max_prompt_length or d.max_prompt_length), truncation=d.truncation,
                    on_bad_record=d.on_bad_record)
  sampling = dict(num_samples=int(g.num_samples), temperature=float(g.temperature), top_p=float(g.top_p),
                  top_k=int(g.top_k), max_new_tokens=int(g.max_new_tokens), seed=int(g.seed), batch_size=batch_size,
                  buckets=[int(b) for b in g.buckets], shard_size=int(g.shard_size))
  return dict(format=str(OUTPUT_FORMAT_VERSION), model=hashing.model_hash(config_schema.model_path(config, "policy")),
              tokenizer=hashing.tokenizer_hash(data_build.tokenizer_path(config)),
              prompts=hashing.hash_paths(list(g.prompt_files)), prompt_config=hashing.hash_json(prompt_cfg),
              sampling=hashing.hash_json(sampling), scorer=hashing.hash_json(scorer_id),
              compute=hashing.hash_json(dict(dtype=cli.compute_dtype(config, g))))


# ---------------------------------------------------------------------------------------------- driver


def run(config: ml_collections.ConfigDict, *, scorer: Scorer | None = None) -> str:
  """Sample, score and binarize the prompts of `config` into `generate.output_dir`; returns that directory.

  Resumable: finished work shards are reused, so an interrupted run continues and writes byte-identical output.
  """
  g = generate_section(config)
  if not g.output_dir:
    raise ValueError("set generate.output_dir (where records.jsonl, pairs.jsonl and summary.json are written)")
  py_scorer, scorer_id = resolve_scorer(g, scorer)
  mesh = parallel.mesh_from_config(config, per_process=True)  # a size that does not fit: an error naming config.mesh.*
  job = jobs.Job("tregjax.generate", g.output_dir,
                 output_components(config, g, scorer_id, round_to_mesh(g.batch_size, mesh)), SUMMARY, jobs.JSON,
                 what="generated pairs", dir_key="generate.output_dir")
  if job.done():
    return g.output_dir
  job.start()

  d = data_build.data_section(config)
  tok = ChatTokenizer(data_build.tokenizer_path(config), d.end_of_turn_token)
  prompt_counts: dict[str, Any] = {}
  prompts = load_prompts(config, tok, prompt_counts)
  ranges = jobs.item_ranges(len(prompts), int(g.shard_size))
  keys = [("shard", k) for k in range(len(ranges))]
  mine = job.mine(keys)
  if mine:
    sampler = Sampler(config, g, mesh, tok)
    sampler.fit_batch(prompts, int(g.shard_size) * int(g.num_samples))
    check_lengths(prompts, int(g.max_new_tokens), sampler.model.config.max_position_embeddings,
                  config_schema.model_path(config, "policy"))
    reward = RewardScorer(config, g, mesh, tok) if g.reward_model else None
    total = sum(len(ranges[k]) for _, k in mine)
    bar = jobs.progress(total, g.progress_bar, "prompt", "generating")
    t0, new_tokens = time.perf_counter(), 0
    for key in mine:
      k = key[1]
      part = [prompts[i] for i in ranges[k]]
      responses = generate_shard(sampler, part, k, g, sampler.eos_ids)
      new_tokens += sum(len(ids) for resp in responses for ids, _ in resp)
      texts = [[response_text(tok, ids, sampler.eos_ids) for ids, _ in resp] for resp in responses]
      scores = score_shard(part, texts, responses, reward, py_scorer)
      records = shard_records(part, responses, scores, tok, sampler.eos_ids)
      job.write(key, dict(shard=k, records=records))
      bar.update(len(part))
      bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)
    bar.close()
    elapsed = time.perf_counter() - t0
    log.info("generated %d prompts x %d samples, %d new tokens in %.1fs (%.1f prompts/s, %.0f tokens/s)", total,
             g.num_samples, new_tokens, elapsed, total / max(elapsed, 1e-9), new_tokens / max(elapsed, 1e-9))
  job.finish(lambda: _assemble(job, keys, prompt_counts))
  return g.output_dir


def _assemble(job: jobs.Job, keys: list[jobs.Key], prompt_counts: dict[str, Any]) -> None:
  """Shards -> records.jsonl and pairs.jsonl (atomic), then summary.json (last: it marks completion)."""
  output_dir = job.out_dir
  records = [record for shard in job.shards(keys) for record in shard["records"]]
  records_path = os.path.join(output_dir, RECORDS)
  pairs, pair_counts = binarize(records, lambda i: f"{records_path}:line {i + 1}")
  for path, lines in ((records_path, records), (os.path.join(output_dir, PAIRS), pairs)):
    storage.write_bytes(path, "".join(jobs.canonical_json(v) + "\n" for v in lines).encode("utf-8"))
  samples = [fin for r in records for fin in r["all_finished"]]
  summary = dict(hash=job.digest, components=job.components, format_version=OUTPUT_FORMAT_VERSION,
                 prompts=prompt_counts, samples=len(samples), unfinished_samples=samples.count(False),
                 empty_responses=sum(not t.strip() for r in records for t in r["all_generated_responses"]),
                 new_tokens=sum(len(ids) for r in records for ids in r["all_generated_ids"]), **pair_counts)
  storage.write_json(os.path.join(output_dir, SUMMARY), summary)
  log.info("%d prompts -> %d pairs (%d all-equal groups skipped, %d with tied best, %d with tied worst, skipped %s); "
           "%s", len(records), pair_counts["pairs"], pair_counts["all_equal"], pair_counts["tied_best"],
           pair_counts["tied_worst"], pair_counts["skipped"], output_dir)


def main(argv: Sequence[str]) -> None:
  del argv
  cli.job_main("tregjax.generate", run)


if __name__ == "__main__":
  cli.job_app_main(main)
