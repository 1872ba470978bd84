"""The offline scoring pass: reference log-probs and per-token rewards for every preference pair, cached once.

    python -m tregjax.score --config configs/x.py [--config.score.batch_size=32 ...]

For each pair and each of chosen/rejected, the reference model scores the response under the plain prompt (per-token
log-probs and their sum, for DPO-style losses) and, by `score.token_reward.source` (an entry of
`tregjax.data.scored_cache.REWARD_SOURCES`: its contexts, second model, hashed keys and rewards):
  contrastive   two more forwards under the contrastive prompts (T-REG): r̂_t = σ(log π(y_t|x_better) −
                log π(y_t|x_worse)) − 0.5 (`losses.contrastive_token_rewards`);
  dpo_implicit  β·(log π_dpo(y_t) − log π_ref(y_t)) from a DPO-trained checkpoint (`token_reward.dpo_checkpoint`);
  r3hf          r_t = RM(x, y≤t) − RM(x, y<t) from a sequence reward model read at every position of ONE forward
                (`token_reward.reward_model`; RM(x, y<1) = the score at the last prompt token);
  confidence    the reference's own confidence, from the plain forward alone (ConfPO-style, no extra cost):
                r̂_t = σ(log π_ref(y_t) − log mean_s π_ref(y_s)) − 0.5 (`losses.confidence_token_rewards`);
  oracle        rewards given by a Python callable `oracle(prompt_messages, response_ids) -> float[len(ids)]`
                (`run(config, oracle=)` or `token_reward.oracle="pkg.module:function"`): ground-truth token labels
                where a task has them (e.g. +0.5 correct / −0.5 wrong / 0 unlabelled), the ceiling of token-level
                regularisation when the token rewards are perfect;
  none          reference log-probs only (rewards are zeros).
A response's ids are the same in every context (never re-tokenized), so token t is the same token under each prompt.

Every context row of every response is sorted by length and cut into batches padded to a bucket (little padding, a
bounded set of jit shapes), run data-parallel over the mesh with the chunked log-softmax (never [B, T, V] float32);
per-response sums and rewards are then combined from the rows' response-coordinate arrays by one jitted function.
Output is written in work shards (`tregjax.jobs`: atomic, deterministic): a rerun skips finished shards and yields
byte-identical output. When every shard exists the scored TFDS dataset (array_record) is assembled and
`cache_meta.json`, holding the hash of (model, tokenizer, prompts, source, data), is written last;
`tregjax.data.scored_cache.check_cache` refuses a cache whose hash differs from the trainer's expectation. The command
(and the train command's scoring stage) first moves a cache of other inputs aside (`scored_cache.set_aside`); `run`
itself, which the experiment runner calls, refuses one. Contrastive
contexts are rendered from the full prompt messages; when the plain prompt was left-truncated they are cut the same
way (`cut_like_plain`: the instruction survives, the prompt's start goes); the reference log-probs use the stored
plain ids. Bad input stops before anything is written: a tokenizer larger than a model's vocabulary, a row longer than
its max_position_embeddings (checked before compiling), a mesh that does not divide the devices (naming
config.mesh.*), and a shard holding a non-finite value (naming the record).

A `data.cache_dir` on object storage (gs://...) is scored in a local staging directory keyed by the cache's hash and
then uploaded with `cache_meta.json` last (`_run_staged`): a torn upload has no marker and is never read as whole.

Config keys read: `model.hf_path`, `model.dtype`, `data.*` (the tokenized dataset, see tregjax.data.build),
`data.cache_dir` (output: a local path or a URI), `mesh.{data,fsdp,tensor}` and the `score` section (`default_score_config()`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tregjax import cli, config_schema, errors, jobs, losses, models, parallel, programs, storage
from tregjax.data import hashing, pipeline, scored_cache, tfds_builder
from tregjax.data import build as data_build
from tregjax.data.scored_cache import CACHE_FORMAT_VERSION, CACHE_META, REWARD_SOURCES, RowValues, cache_components
from tregjax.data.tokenize import ChatTokenizer, with_instruction

log = logging.getLogger("tregjax.score")


def default_score_config() -> ml_collections.ConfigDict:
  """The `score` section: every key the scoring pass reads, with its default (config_schema.score_defaults; the
  trainer's config embeds it)."""
  return config_schema.score_defaults()


def score_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.score` over the defaults (so a config without some keys still runs), with every key a command section
  shares resolved (config_schema.INHERITED: buckets, chunk_size, dtype, progress_bar); an unknown key or source is a
  ConfigError naming it and the closest known one."""
  merged = config_schema.section(config, "score")
  scored_cache.source_spec(merged.token_reward.source)
  return merged


class NonFiniteScoreError(ValueError):
  """A scored value (reference log-prob or token reward) that is NaN or infinite: the shard is not written."""


# ---------------------------------------------------------------------------------------------- dataset


def _dataset_dir(config: ml_collections.ConfigDict) -> str:
  """The tokenized dataset: built (or reused) from data.train_files, else the one under data.dataset_dir."""
  d = data_build.data_section(config)
  if d.train_files:
    return data_build.build_dataset(config)
  if not d.dataset_dir:
    raise ValueError("set data.train_files (to tokenize) or data.dataset_dir (a tokenized dataset)")
  return tfds_builder.resolve(d.dataset_dir)


# ----------------------------------------------------------------------------------------- jitted scoring


def _response_coords(per_position: jax.Array, start: jax.Array, length: int) -> jax.Array:
  """values[b, start[b] + j] for j < length (clipped at the row end; callers mask beyond the response)."""
  idx = jnp.clip(start[:, None] + jnp.arange(length)[None, :], 0, per_position.shape[1] - 1)
  return jnp.take_along_axis(per_position, idx, axis=1)


def make_row_fn(kind: str, graphdef: Any, *, pad_id: int, chunk_size: int) -> Callable:
  """A pure function (state, tokens[B, T], segment_ids[B, T], prompt_len[B]) -> per-row values in response
  coordinates (index j = response token j):
    "logps":  log π(y_j | context, y<j)   [B, T]
    "scores": (reward-model score after reading y_j [B, T], score at the last prompt token [B])
  """

  def fn(state, tokens, segment_ids, prompt_len):
    model = nnx.merge(graphdef, state)
    t = tokens.shape[1]
    if kind == "scores":
      scores = model.scores(tokens, segment_ids=segment_ids)
      initial = jnp.take_along_axis(scores, (prompt_len - 1)[:, None], axis=1)[:, 0]
      return _response_coords(scores, prompt_len, t), initial  # R(x, y<=j) is read where token j is
    logps = losses.model_token_logps(model, tokens, losses.next_token_labels(tokens, pad_id), chunk_size=chunk_size,
                                     segment_ids=segment_ids)
    return _response_coords(logps, prompt_len - 1, t)

  return fn


def combine(source: str, beta: float, ref: jax.Array, mask: jax.Array, **arrays: jax.Array
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(ref token log-probs, their sum, token rewards) from per-response arrays [U, R] in response coordinates; the
  `arrays` are the other `RowValues` fields the source reads (better/worse, second, initial)."""
  ref = jnp.where(mask, ref, 0.0)
  make = REWARD_SOURCES[source].rewards
  rewards = make(RowValues(ref, mask, beta, **arrays)) if make else jnp.zeros_like(ref)
  return ref, losses.sequence_logps(ref, mask), rewards


# ------------------------------------------------------------------------------------------ host side


@dataclasses.dataclass
class Unit:
  """One response to score: its context rows (plain first) and where its response starts in each."""
  rows: list[list[int]]
  prompt_lens: list[int]
  resp_len: int


class Contexts:
  """Prompt ids of each context of a record (plain = the stored ids; contrastive = re-rendered from messages)."""

  def __init__(self, tok: ChatTokenizer, s: ml_collections.ConfigDict, max_prompt_length: int = 0):
    self.tok, self.source = tok, s.token_reward.source
    role = s.instruction_role
    if role == "auto":
      role = "system" if tok.supports_system_role() else "user"
    self.role, self.better, self.worse = role, s.better_instruction, s.worse_instruction
    self.max_prompt_length = max_prompt_length  # the tokenized dataset's: a plain prompt this long may be cut
    self.truncated = 0  # contrastive contexts cut like their plain prompt

  def prompts(self, record: dict[str, Any]) -> list[list[int]]:
    plain = [int(x) for x in record["prompt_ids"]]
    if not REWARD_SOURCES[self.source].contrastive:
      return [plain]
    messages = json.loads(_text(record["prompt_messages"]))
    contrastive = [self.tok.prompt_ids(with_instruction(messages, self.better, self.role)),
                   self.tok.prompt_ids(with_instruction(messages, self.worse, self.role))]
    if self.max_prompt_length and len(plain) >= self.max_prompt_length:
      full = self.tok.prompt_ids(messages)
      if len(full) > len(plain):  # the plain prompt was left-truncated: cut the contrastive ones the same way
        contrastive = [cut_like_plain(c, full, len(plain)) for c in contrastive]
        self.truncated += 2
    return [plain] + contrastive


def cut_like_plain(context: list[int], full_plain: list[int], kept: int) -> list[int]:
  """A contrastive prompt cut the way its plain prompt was: the instruction part (where the two renderings differ,
  at the start) is kept, and of the part they share (their common suffix: the conversation's end and the generation
  prompt) only the `kept` last tokens the plain prompt kept. So the better and worse rows hold the instruction and
  exactly the plain row's prompt tokens, and are never longer than the instruction plus the plain prompt budget."""
  shared = 0
  while shared < min(len(context), len(full_plain)) and context[-1 - shared] == full_plain[-1 - shared]:
    shared += 1
  if kept >= shared:  # the plain cut fell in its own head only (before the shared part): nothing shared is lost
    return context
  return context[:len(context) - shared] + context[len(context) - kept:]


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def units_of(record: dict[str, Any], contexts: Contexts) -> list[Unit]:
  """The chosen and rejected units of one record: each context's prompt ids + the SAME response ids."""
  prompts = contexts.prompts(record)
  out = []
  for side in ("chosen", "rejected"):
    response = [int(x) for x in record[f"{side}_ids"]]
    out.append(Unit([p + response for p in prompts], [len(p) for p in prompts], len(response)))
  return out


class Scorer:
  """Holds the model(s), the mesh and one compiled function per bucket shape.

  Rows (every context of every response) are sorted by length and cut into batches under a token budget, each padded
  to the smallest bucket that holds its longest row: little padding, a bounded set of shapes. Per-response
  quantities (sums, rewards) are then combined by `combine` from the rows' response-coordinate arrays.
  """

  def __init__(self, config: ml_collections.ConfigDict, s: ml_collections.ConfigDict, pad_id: int,
               tokenizer: ChatTokenizer | None = None, *, mesh: Mesh):
    self.s, self.source, self.pad_id = s, s.token_reward.source, pad_id
    self.spec = spec = REWARD_SOURCES[self.source]
    self.mesh = mesh  # parallel.mesh_from_config(config, per_process=True) in `run`
    dtype = jnp.dtype(cli.compute_dtype(config, s))
    paths = [config_schema.model_path(config, "reference")]
    if spec.second_model:
      paths.append(s.token_reward[spec.second_model] or
                   _raise(f"score.token_reward.{spec.second_model} is not set (source={self.source!r})"))
    loaded = [models.from_pretrained(p, dtype=dtype, param_dtype=dtype, mesh=self.mesh) for p in paths]
    if spec.second_model and (spec.second_kind == "scores") != isinstance(loaded[1], models.RewardModel):
      raise ValueError(f"score.token_reward.{spec.second_model}={paths[1]} is "
                       f"{'not ' if spec.second_kind == 'scores' else ''}a sequence reward model "
                       f"(*ForSequenceClassification with num_labels=1)")
    if isinstance(loaded[0], models.RewardModel):
      raise ValueError(f"model.hf_path={paths[0]} is a reward model; the reference must be a causal LM")
    if tokenizer is not None:  # every model reads the same ids: an id past one's embedding scores NaN, silently
      for path, model in zip(paths, loaded):
        models.check_tokenizer_vocab(tokenizer.vocab_size, model,
                                     where=f"tregjax.score: tokenizer {tokenizer.path} with the model {path}")
    # The longest row any of the models was made for (rows are checked against it before anything compiles).
    self.max_positions = min(int(m.config.max_position_embeddings) for m in loaded)
    self.max_positions_of = paths[min(range(len(loaded)), key=lambda k: loaded[k].config.max_position_embeddings)]
    self.ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.batch_tokens = batch_tokens(s, self.ways, jax.default_backend())
    rows_sh = parallel.batch_sharding(self.mesh, 2)
    self._fns, self._states = [], []
    for k, model in enumerate(loaded):
      graphdef, state = nnx.split(model)
      kind = spec.second_kind if k == 1 else "logps"
      fn = make_row_fn(kind, graphdef, pad_id=pad_id, chunk_size=s.chunk_size)
      self._fns.append(jax.jit(fn, in_shardings=(parallel.state_shardings(state, self.mesh), rows_sh, rows_sh,
                                                 parallel.batch_sharding(self.mesh, 1))))
      self._states.append(state)
    self._compiled: dict[tuple[int, ...], Any] = {}  # (model, rows, T) -> the compiled row function
    self._combine = jax.jit(functools.partial(combine, self.source, float(s.token_reward.beta)))

  def chunk_rows(self, lengths: list[int]) -> list[tuple[list[int], int, int]]:
    """Row indices sorted by length, cut into (indices, T, padded row count) chunks under a token budget.

    T is the smallest bucket holding the chunk's longest row (fitted: shrunk to the longest of `lengths` in that
    bucket, rounded up to a multiple of bucket/8, with score.fit_buckets); a chunk holds at most `batch_tokens // T` rows (and
    `batch_size`); its row count is padded to a power-of-two multiple of the data-parallel size, so shapes stay few.
    """
    ways, s = self.ways, self.s

    def capacity(t):
      return batch_rows(s, ways, self.batch_tokens, t)

    def padded_rows(n, t):
      size = ways
      while size < n:
        size *= 2
      return min(size, capacity(t)) if n <= capacity(t) else n

    # Each bucket shrinks to the longest row of these rows that it holds (data.pipeline.fitted_buckets, as the
    # trainer's batches do): rows of 140-200 tokens pad to 224, not 256. These rows are one shard's, and every shard
    # is fitted on its own, so lengths step by bucket/8: at most 8 compiled lengths per bucket over all shards.
    fitted = pipeline.fitted_buckets(lengths, s.buckets, steps=8) if s.fit_buckets else {}

    def length_of(row):
      t = pipeline.bucket_of(lengths[row], s.buckets, extend=True)
      return fitted.get(t, t)

    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    chunks, current = [], []
    for i in order:
      t = length_of(i)
      if current and len(current) + 1 > capacity(t):
        t_chunk = length_of(current[-1])
        chunks.append((current, t_chunk, padded_rows(len(current), t_chunk)))
        current = []
      current.append(i)
    if current:
      t_chunk = length_of(current[-1])
      chunks.append((current, t_chunk, padded_rows(len(current), t_chunk)))
    return chunks

  def _call(self, k: int, args: tuple[Any, ...], longest: Callable[[], str]) -> Any:
    """Model k's row function on one batch, compiled once per shape. Before a shape first runs, its compiled memory
    analysis is held against the memory the device has free: a batch that would not fit is refused, naming its
    bucket and the record with its longest row, instead of being OOM-killed without a message."""
    b, t = args[1].shape
    key = (k, b, t)
    if key not in self._compiled:
      with parallel.use_mesh(self.mesh):  # traced here: the model's activation sharding constraints need the mesh
        compiled = self._fns[k].lower(*args).compile()
      need = batch_bytes(compiled)
      if self.mesh.devices.flat[0].platform == "cpu":  # host memory is shared by every CPU device of the mesh
        need = None if need is None else need * self.mesh.devices.size
      free = free_device_bytes(self.mesh.devices.flat[0])
      if need is not None and free is not None and need > free:
        raise ValueError(f"{longest()}: a batch of {b} rows in bucket T={t} would allocate {need / 2**30:.2f} GiB "
                         f"per device (compiled memory analysis) but {free / 2**30:.2f} GiB is free; lower "
                         f"score.batch_tokens / score.batch_size, or data.max_length")
      self._compiled[key] = compiled
    return self._compiled[key](*args)

  def _rows(self, k: int, rows: list[tuple[list[int], int]], on_tokens: Callable[[int], None] | None,
            names: Callable[[int], str] | None = None) -> list[Any]:
    """Model k over (ids, prompt_len) rows -> per row: response-coordinate values (+ initial score for "scores").
    `names(row index)` names a row's record in errors."""
    out: list[Any] = [None] * len(rows)
    for chunk, t, b in self.chunk_rows([len(r[0]) for r in rows]):
      tokens = np.full((b, t), self.pad_id, np.int32)
      segs = np.zeros((b, t), np.int32)
      prompt_len = np.ones((b,), np.int32)
      for r, i in enumerate(chunk):
        ids, p = rows[i]
        tokens[r, :len(ids)] = ids
        segs[r, :len(ids)] = 1
        prompt_len[r] = p
      longest = lambda chunk=chunk: (names(chunk[-1]) if names else f"row {chunk[-1]}")  # noqa: E731
      values = jax.device_get(self._call(k, (self._states[k], tokens, segs, prompt_len), longest))
      for r, i in enumerate(chunk):
        n = len(rows[i][0]) - rows[i][1]
        out[i] = (values[0][r, :n], values[1][r]) if isinstance(values, tuple) else values[r, :n]
      if on_tokens:
        on_tokens(sum(len(rows[i][0]) for i in chunk))
    return out

  def score_units(self, units: list[Unit], on_tokens: Callable[[int], None] | None = None,
                  where: Callable[[int], str] | None = None) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """(ref token log-probs, ref sum, token rewards) per unit, in input order; response coordinates, cropped.
    `where(pair index)` names a pair's record in errors (units come two per pair: chosen, rejected)."""
    contexts = 3 if self.spec.contrastive else 1
    rows = [(u.rows[c], u.prompt_lens[c]) for u in units for c in range(contexts)]
    names = (lambda i: where(i // contexts // 2)) if where else None  # noqa: E731
    first = self._rows(0, rows, on_tokens, names)
    per_context = [first[c::contexts] for c in range(contexts)]
    extra = self._rows(1, rows, on_tokens, names) if len(self._fns) > 1 else None
    # Pad to [U, R] with U a multiple of 64 and R a bucket, so the combine step compiles a bounded set of shapes.
    n_units = -(-len(units) // 64) * 64
    width = pipeline.bucket_of(max(u.resp_len for u in units), self.s.buckets, extend=True)

    def padded(values):
      out = np.zeros((n_units, width), np.float32)
      for i, v in enumerate(values):
        out[i, :len(v)] = v
      return out

    mask = np.zeros((n_units, width), bool)
    for i, u in enumerate(units):
      mask[i, :u.resp_len] = True
    args: dict[str, Any] = {}
    if self.spec.contrastive:
      args.update(better=padded(per_context[1]), worse=padded(per_context[2]))
    if self.spec.second_kind == "scores" and extra is not None:
      initial = np.zeros((n_units,), np.float32)
      initial[:len(units)] = [e[1] for e in extra]
      args.update(second=padded([e[0] for e in extra]), initial=initial)
    elif extra is not None:
      args.update(second=padded(extra))
    ref, total, rewards = jax.device_get(self._combine(padded(per_context[0]), mask, **args))
    return [(np.asarray(ref[i, :u.resp_len], np.float32), float(total[i]),
             np.asarray(rewards[i, :u.resp_len], np.float32)) for i, u in enumerate(units)]


def batch_tokens(s: ml_collections.ConfigDict, ways: int, platform: str) -> int:
  """Tokens per scoring batch: `score.batch_tokens`, else 16384 per data-parallel way (1024 on CPU)."""
  return s.batch_tokens or ways * (1024 if platform == "cpu" else 16384)


def batch_rows(s: ml_collections.ConfigDict, ways: int, tokens: int, t: int) -> int:
  """The most rows a scoring batch of length `t` holds: `tokens // t` (at most `score.batch_size`), a multiple of
  the data-parallel `ways` and at least one row per way."""
  return max(ways, min(s.batch_size, tokens // t) // ways * ways)


def _raise(message: str):
  raise ValueError(message)


def batch_bytes(compiled: Any) -> int | None:
  """What one call of a compiled function allocates per device (its temporaries and outputs), from XLA's memory
  analysis; None where the backend does not say."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if m is None:
    return None
  return int(m.temp_size_in_bytes) + int(m.output_size_in_bytes)


def free_device_bytes(device: Any) -> int | None:
  """Memory free on `device`: its allocator's limit minus what is in use (GPU/TPU), the host's available physical
  memory on CPU; None when unknown (then batches are not bounded)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform == "cpu" and hasattr(os, "sysconf"):
    try:
      return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
      return None
  return None


def check_row_lengths(units: Sequence[Unit], where: Callable[[int], str], limit: int, model_path: str) -> None:
  """Refuse a row longer than the model's max_position_embeddings before it is batched and compiled: positions past
  the limit are not what the model was trained on, and one such row sets the padded length of its whole batch."""
  names = ("plain", "better", "worse")
  for n, unit in enumerate(units):
    for c, row in enumerate(unit.rows):
      if len(row) > limit:
        raise ValueError(f"{where(n // 2)}: the {names[c]} context of the {('chosen', 'rejected')[n % 2]} response "
                         f"is {len(row)} tokens, longer than max_position_embeddings={limit} of {model_path}; lower "
                         f"data.max_length / data.max_prompt_length (truncation='truncate' cuts every context)")


def check_finite(results: Sequence[tuple[np.ndarray, float, np.ndarray]], where: Callable[[int], str]) -> None:
  """Refuse to write a shard holding a NaN/inf reference log-prob or token reward, naming the first such record."""
  for n, (ref, total, rewards) in enumerate(results):
    side = ("chosen", "rejected")[n % 2]
    for field, values in ((f"ref_{side}_token_logps", ref), (f"ref_{side}_logps", np.asarray([total])),
                          (f"{side}_token_rewards", rewards)):
      bad = np.flatnonzero(~np.isfinite(values))
      if bad.size:
        raise NonFiniteScoreError(
            f"{where(n // 2)}: field {field!r} has {bad.size} non-finite value(s) (first at response token "
            f"{int(bad[0])}: {values[bad[0]]}); the shard is not written. Check that the tokenizer belongs to the "
            f"model and that its weights are finite; score.dtype='float32' rules out bfloat16 overflow")


# ------------------------------------------------------------------------------------------ work shards


def _shard_arrays(indices: range, results: list[Any]) -> dict[str, np.ndarray]:
  """One work shard: flat arrays per side (concatenated per-token values + lengths)."""
  arrays: dict[str, np.ndarray] = {"indices": np.asarray(list(indices), np.int64)}
  for k, side in enumerate(("chosen", "rejected")):
    side_results = results[k::2]
    arrays[f"{side}_lengths"] = np.asarray([len(r[0]) for r in side_results], np.int32)
    arrays[f"{side}_logps"] = np.asarray([r[1] for r in side_results], np.float32)
    arrays[f"{side}_token_logps"] = np.concatenate([r[0] for r in side_results]).astype(np.float32)
    arrays[f"{side}_token_rewards"] = np.concatenate([r[2] for r in side_results]).astype(np.float32)
  return arrays


def _shard_records(arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
  out = [dict() for _ in range(len(arrays["indices"]))]
  for side in ("chosen", "rejected"):
    offsets = np.concatenate([[0], np.cumsum(arrays[f"{side}_lengths"])])
    for i, rec in enumerate(out):
      rec[f"ref_{side}_logps"] = np.float32(arrays[f"{side}_logps"][i])
      rec[f"ref_{side}_token_logps"] = arrays[f"{side}_token_logps"][offsets[i]:offsets[i + 1]]
      rec[f"{side}_token_rewards"] = arrays[f"{side}_token_rewards"][offsets[i]:offsets[i + 1]]
  return out


# ---------------------------------------------------------------------------------------------- driver


Oracle = Callable[[list[dict[str, str]], list[int]], np.ndarray]


def resolve_oracle(s: ml_collections.ConfigDict, oracle: Oracle | None) -> Oracle | None:
  """The host-side token-reward callable of a `host` source (oracle): the `oracle` argument, else
  `score.token_reward.oracle`; None for the other sources."""
  source = s.token_reward.source
  if not REWARD_SOURCES[source].host:
    if oracle is not None:
      raise ValueError(f"an oracle was passed but score.token_reward.source is {source!r}, which takes no host "
                       f"rewards (oracle does)")
    return None
  if oracle is None:
    if ":" not in (s.token_reward.oracle or ""):
      raise ValueError(f"score.token_reward.source={source!r} needs score.token_reward.oracle='pkg.module:function' "
                       "(or run(config, oracle=...))")
    oracle = programs.load(s.token_reward.oracle, "score.token_reward.oracle")
  return oracle


def oracle_rewards(oracle: Oracle, record: dict[str, Any], side: str, where: str) -> np.ndarray:
  """The oracle's float32 rewards for one response, checked: one finite value per response id."""
  ids = [int(x) for x in record[f"{side}_ids"]]
  rewards = np.asarray(oracle(json.loads(_text(record["prompt_messages"])), ids), np.float32)
  if rewards.shape != (len(ids),) or not np.all(np.isfinite(rewards)):
    raise ValueError(f"{where}: field '{side}_token_rewards': the oracle returned shape {rewards.shape} (finite: "
                     f"{bool(np.all(np.isfinite(rewards)))}) for a response of {len(ids)} tokens")
  return rewards


def run(config: ml_collections.ConfigDict, *, oracle: Oracle | None = None) -> str:
  """Score the tokenized dataset of `config` into `data.cache_dir`; returns that directory (resumable).

  The returned directory is what `data.cache_dir` should name for training (`pipeline.make_iterator` resolves it).
  `oracle`: the token-reward callable of source="oracle" (else `score.token_reward.oracle` names one).
  """
  s = score_section(config)
  oracle = resolve_oracle(s, oracle)
  cache_dir = data_build.data_section(config).get("cache_dir", "")
  if not cache_dir:
    raise ValueError("set data.cache_dir (where the scored cache is written)")
  dataset_dir = jobs.process_zero_first("tregjax.score dataset", lambda: _dataset_dir(config))
  if storage.is_uri(cache_dir):
    return _run_staged(config, str(cache_dir), dataset_dir, oracle)
  job = jobs.Job("tregjax.score", cache_dir, cache_components(config, dataset_dir), CACHE_META, jobs.ARRAYS,
                 what="a scored cache", dir_key="data.cache_dir")
  if job.done():
    return cache_dir
  job.start()

  data_meta = tfds_builder.read_metadata(dataset_dir)
  tok = ChatTokenizer(data_build.tokenizer_path(config), data_build.data_section(config).end_of_turn_token)
  contexts = Contexts(tok, s, int(data_meta.get("max_prompt_length", 0) or
                                  data_build.data_section(config).max_prompt_length))
  splits = [sp for sp in s.splits if sp in _splits(dataset_dir)]
  sources = {sp: tfds_builder.data_source(dataset_dir, sp) for sp in splits}
  ranges = {sp: jobs.item_ranges(len(sources[sp]), int(s.shard_size)) for sp in splits}
  keys = [(sp, k) for sp in splits for k in range(len(ranges[sp]))]
  mine = job.mine(keys)
  if mine:
    scorer = Scorer(config, s, pad_id=int(data_meta.get("pad_id", tok.pad_id)), tokenizer=tok,
                    mesh=parallel.mesh_from_config(config, per_process=True))
    for sp in splits:  # every plain row, from the lengths sidecar, before anything compiles
      lengths = tfds_builder.lengths(dataset_dir, sp, sources[sp])
      if lengths.size and int(lengths.max()) > scorer.max_positions:
        i = int(np.argmax(lengths.max(axis=1)))
        check_row_lengths(units_of(sources[sp][i], contexts), lambda _: _record_name(sources[sp], sp, i),
                          scorer.max_positions, scorer.max_positions_of)
    total_pairs = sum(len(ranges[sp][k]) for sp, k in mine)
    bar = jobs.progress(total_pairs, s.progress_bar, "pair", "scoring")
    t0, tokens_seen = time.perf_counter(), [0]

    def on_tokens(n):
      tokens_seen[0] += n
      bar.set_postfix(tok_s=f"{tokens_seen[0] / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)

    for sp, k in mine:
      indices = ranges[sp][k]
      units = [u for i in indices for u in units_of(sources[sp][i], contexts)]
      where = lambda n, sp=sp, indices=indices: _record_name(sources[sp], sp, indices[n])  # noqa: E731
      check_row_lengths(units, where, scorer.max_positions, scorer.max_positions_of)
      results = scorer.score_units(units, on_tokens, where)
      if oracle is not None:  # the reference's log-probs from the pass, the token rewards from the oracle
        results = [(ref, total, oracle_rewards(oracle, sources[sp][indices[n // 2]], ("chosen", "rejected")[n % 2],
                                               f"{sp} record {indices[n // 2]}"))
                   for n, (ref, total, _) in enumerate(results)]
      check_finite(results, where)
      job.write((sp, k), _shard_arrays(indices, results))
      bar.update(len(indices))
    bar.close()
    log.info("scored %d pairs, %d tokens in %.1fs", total_pairs, tokens_seen[0], time.perf_counter() - t0)
    if contexts.truncated:
      log.warning("cut %d contrastive contexts like their truncated plain prompt (instruction kept, the prompt's "
                  "start dropped; data.max_prompt_length=%d)", contexts.truncated, contexts.max_prompt_length)
  job.finish(lambda: _assemble(job, dataset_dir, sources, keys, s.token_reward.source, cli.compute_dtype(config, s)))
  return cache_dir


def _run_staged(config: ml_collections.ConfigDict, cache_dir: str, dataset_dir: str, oracle: Oracle | None) -> str:
  """Score into a cache on object storage: the job runs in a local staging directory keyed by the cache's hash
  (`scored_cache.staged_path`: resumable there, like a local cache), then process 0 uploads the finished cache with
  its marker last (`scored_cache.upload`). A marker already there: done when its hash is this config's, else
  refused in one line (nothing on object storage is overwritten)."""
  digest = hashing.hash_json(cache_components(config, dataset_dir))
  marker = storage.join(cache_dir, CACHE_META)
  if storage.exists(marker):
    found = storage.read_json(marker).get("hash")
    if found != digest:
      raise errors.StaleCacheError(f"{cache_dir} already holds a scored cache of other inputs (hash "
                                   f"{str(found)[:16]}, this config {digest[:16]}); choose another data.cache_dir "
                                   f"or delete it")
    log.info("a scored cache in %s is complete and current", cache_dir)
    return cache_dir
  if jax.process_count() > 1 and not os.environ.get("TREGJAX_STAGING_DIR"):
    raise errors.ConfigError(f"config.data.cache_dir={cache_dir!r}: scoring on {jax.process_count()} processes into "
                             f"object storage stages the work shards in one directory every process sees: set "
                             f"TREGJAX_STAGING_DIR to a shared mount, or score into a shared-filesystem cache_dir")
  staged = scored_cache.staged_path(digest, "score")
  local_config = config.copy_and_resolve_references()
  local_config.data.cache_dir = staged
  run(local_config, oracle=oracle)
  if jax.process_index() == 0:
    log.info("uploading the scored cache %s to %s (cache_meta.json last)", staged, cache_dir)
    scored_cache.upload(staged, cache_dir)
  jobs.barrier("tregjax.score uploaded")
  return cache_dir


def _record_name(source: Any, split: str, index: int) -> str:
  """`split record N (file:line M)`: where a person finds the record the error is about."""
  return f"{split} record {index} ({_text(source[index]['example_id'])})"


def _splits(dataset_dir: str) -> list[str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return list(tfds.builder_from_directory(dataset_dir).info.splits)


def _assemble(job: jobs.Job, dataset_dir: str, sources: dict[str, Any], keys: list[jobs.Key], source_name: str,
              dtype: str) -> None:
  """Shards + tokenized records -> the scored TFDS dataset; then cache_meta.json (last: marks completion)."""
  digest, components = job.digest, job.components

  def gen_for(split):
    def gen():
      src = sources[split]
      for arrays in job.shards([key for key in keys if key[0] == split]):
        for i, scored in zip(arrays["indices"], _shard_records(arrays)):
          rec = src[int(i)]
          out = {name: rec[name] for name in tfds_builder.TOKENIZED_FEATURES}
          out.update(scored, token_reward_source=source_name)
          yield out
    return gen

  meta = dict(kind="scored", format_version=CACHE_FORMAT_VERSION, hash=digest, components=components,
              token_reward_source=source_name, pad_id=tfds_builder.read_metadata(dataset_dir).get("pad_id", 0),
              end_of_turn_id=tfds_builder.read_metadata(dataset_dir).get("end_of_turn_id"))
  out = tfds_builder.write("scored", job.out_dir, "h" + digest[:16], {sp: gen_for(sp) for sp in sources}, meta)
  records = {sp: len(src) for sp, src in sources.items()}
  storage.write_json(os.path.join(job.out_dir, CACHE_META), dict(
      hash=digest, components=components, records=records, token_reward_source=source_name, dtype=dtype,
      dataset=os.path.relpath(out, job.out_dir), format_version=CACHE_FORMAT_VERSION))


def run_command(config: ml_collections.ConfigDict) -> str:
  """`python -m tregjax.score`: writes where `python -m tregjax.train` with the same config looks. As there, a cache
  of other inputs in data.cache_dir is moved aside first (`scored_cache.set_aside`), not refused nor overwritten."""
  jobs.process_zero_first("tregjax.score set aside", lambda: scored_cache.set_aside(config, log))
  return run(config)


def main(argv: Sequence[str]) -> None:
  del argv
  cli.job_main("tregjax.score", run_command)


if __name__ == "__main__":
  cli.job_app_main(main)
