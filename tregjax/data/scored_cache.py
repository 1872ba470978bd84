"""The scored cache's contract: which token-reward sources exist, what inputs a cache depends on, and the check.

`tregjax.score` writes a cache and, last, `cache_meta.json` holding the hash of (model, tokenizer, prompts, source,
data); the trainer recomputes that hash from its own config and refuses a cache whose hash differs. Both read it
here, not in the scoring CLI, and a new token-reward source is one `REWARD_SOURCES` entry: its inputs (hashed here)
and its rewards (computed by the scoring pass). The module imports only the hashing helpers at the top; the config
schema, the losses and the data builder where they are used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from collections.abc import Callable
from typing import Any, NamedTuple

from tregjax import config_schema, errors, losses, storage
from tregjax.data import hashing, tfds_builder
from tregjax.data import build as data_build

CACHE_FORMAT_VERSION = 1
CACHE_META = "cache_meta.json"


class RowValues(NamedTuple):
  """What a token-reward source may read, per response in response coordinates [U, R] (initial: [U])."""
  ref: Any  # the reference's log-probs under the plain prompt (0 off the mask)
  mask: Any
  beta: float
  better: Any = None  # the reference under the better / worse prompts (contrastive sources)
  worse: Any = None
  second: Any = None  # the second model's log-probs or prefix scores
  initial: Any = None  # a reward model's prompt-only score


@dataclasses.dataclass(frozen=True)
class RewardSource:
  """One token-reward source of the scoring pass: what it needs and how its rewards are made.

  rewards: RowValues -> token rewards [U, R] (jitted with the scoring pass's combine step); None: zeros, or the
    host's rewards when `host` is set.
  host: the rewards come from a Python callable on the host (`score.run(oracle=)` or `score.token_reward.oracle`).
  contrastive: also score every response under the better and worse prompts (3 context rows instead of 1).
  second_model: the `score.token_reward` key naming a second model scored over the plain row ("" = none), whose
    output is `second`: "logps" (a causal LM's token log-probs) or "scores" (a sequence reward model read at every
    position, with `initial`), by `second_kind`.
  hashed: further `score.token_reward` keys that define the cache (the second model is hashed by content).
  """
  rewards: Callable[[RowValues], Any] | None
  host: bool = False
  contrastive: bool = False
  second_model: str = ""
  second_kind: str = "logps"
  hashed: tuple[str, ...] = ()


def _losses():
  return losses


REWARD_SOURCES: dict[str, RewardSource] = {
    "contrastive": RewardSource(lambda v: _losses().contrastive_token_rewards(v.better, v.worse, v.mask),
                                contrastive=True),
    "dpo_implicit": RewardSource(
        lambda v: _losses().dpo_implicit_token_rewards(v.second, v.ref, v.mask, beta=v.beta),
        second_model="dpo_checkpoint", hashed=("beta",)),
    "r3hf": RewardSource(lambda v: _losses().r3hf_token_rewards(v.second, v.mask, v.initial),
                         second_model="reward_model", second_kind="scores"),
    "confidence": RewardSource(lambda v: _losses().confidence_token_rewards(v.ref, v.mask)),
    "oracle": RewardSource(None, host=True, hashed=("oracle", "oracle_id")),
    "none": RewardSource(None),
}
SOURCES = tuple(REWARD_SOURCES)


def source_spec(name: str) -> RewardSource:
  """The registry entry of `score.token_reward.source`; an unknown name is a ConfigError naming the closest one."""
  if name not in REWARD_SOURCES:
    raise errors.ConfigError(f"config.score.token_reward.source={name!r}: must be one of {SOURCES}"
                                    f"{config_schema.suggestion(name, SOURCES)}")
  return REWARD_SOURCES[name]


def _data_hash(config, dataset_dir: str | None) -> str | None:
  """The tokenized dataset's hash, without building anything (a check must not have side effects); None when the
  config names no data (a trainer given only data.cache_dir: `check_cache` then takes the cache's own)."""
  if dataset_dir:
    return tfds_builder.read_metadata(dataset_dir)["hash"]
  d = data_build.data_section(config)
  if d.train_files:
    return data_build.dataset_hash(config)
  if not d.get("dataset_dir"):
    return None
  return tfds_builder.read_metadata(tfds_builder.resolve(d.dataset_dir))["hash"]


def cache_components(config, dataset_dir: str | None = None) -> dict[str, str]:
  """Hashes of each input the cache depends on: model, tokenizer, prompts, source, data.

  The compute dtype is recorded in the cache metadata but not hashed: a cache scored in float32 serves a bfloat16
  training run of the same reference.
  """
  s = config_schema.section(config, "score")
  tr = s.token_reward
  spec = source_spec(tr.source)
  source: dict[str, Any] = dict(source=tr.source)
  source.update({k: float(tr[k]) if k == "beta" else tr[k] for k in spec.hashed})
  if spec.second_model:
    source[spec.second_model] = hashing.model_hash(tr[spec.second_model])
  prompts = dict(better=s.better_instruction, worse=s.worse_instruction, role=s.instruction_role) \
      if spec.contrastive else {}
  return dict(
      format=str(CACHE_FORMAT_VERSION),
      model=hashing.model_hash(config_schema.model_path(config, "reference")),
      tokenizer=hashing.tokenizer_hash(data_build.tokenizer_path(config)),
      prompts=hashing.hash_json(prompts),
      source=hashing.hash_json(source),
      data=_data_hash(config, dataset_dir))


def cache_hash(config, dataset_dir: str | None = None) -> str:
  """The hash a cache scored with `config` carries (what the trainer passes to `check_cache`)."""
  return hashing.hash_json(cache_components(config, dataset_dir))


def unfinished(cache_dir: str) -> errors.StaleCacheError:
  """The error for a cache directory (local or URI) without its completion marker."""
  return errors.StaleCacheError(f"{cache_dir} is not a finished scored cache (no {CACHE_META}); run "
                                f"`python -m tregjax.score` with this config (it resumes an interrupted run)")


def check_cache(cache_dir: str, expected_hash: str | dict[str, str]) -> dict[str, Any]:
  """Refuse a missing, incomplete or stale cache with a clear message; returns its metadata.

  `expected_hash` is `cache_hash(config)` or `cache_components(config)` (then the message names what changed; its
  data component None -- a config that names only the cache, no data files -- takes the cache's). `cache_dir`: a
  local path or a URI (its marker read there).
  """
  path = storage.join(cache_dir, CACHE_META)
  if not storage.exists(path):
    raise unfinished(cache_dir)
  meta = storage.read_json(path)
  if isinstance(expected_hash, dict) and expected_hash.get("data") is None:  # the config names no data: the cache's
    expected_hash = dict(expected_hash, data=meta.get("components", {}).get("data"))
  expected = expected_hash if isinstance(expected_hash, str) else hashing.hash_json(expected_hash)
  if meta["hash"] != expected:
    changed = ""
    if isinstance(expected_hash, dict):
      keys = set(expected_hash) | set(meta.get("components", {}))
      diff = sorted(k for k in keys if meta.get("components", {}).get(k) != expected_hash.get(k))
      changed = f"; changed inputs: {', '.join(diff)}"
    raise errors.StaleCacheError(f"scored cache {cache_dir} was made from other inputs (cache hash "
                                 f"{meta['hash'][:16]}, expected {expected[:16]}{changed}); rescore with "
                                 f"`python -m tregjax.score` into a new data.cache_dir")
  return meta


# What each hashed input of a cache is, in the words of the config keys that set it (the line naming what changed).
COMPONENT_KEYS = {
    "format": "the cache format version (a tregjax upgrade)",
    "model": "model (the reference, model.hf_path: its config, tokenizer and weight files)",
    "tokenizer": "tokenizer (its files)",
    "prompts": "prompts (score.better_instruction / worse_instruction / instruction_role)",
    "source": "token-reward source (score.token_reward)",
    "data": "data (the files of data.train_files / data.validation_files, or the data.* keys that tokenize them)",
}


def _found_digest(cache_dir: str) -> tuple[str | None, dict[str, str] | None]:
  """(digest, components) of what `cache_dir` holds: a finished cache's marker, else the digest stamped in the
  header of its first work shard (an unfinished cache: components unknown), else (None, None)."""
  marker = storage.join(cache_dir, CACHE_META)
  if storage.exists(marker):
    meta = storage.read_json(marker)
    return meta.get("hash"), meta.get("components")
  work = os.path.join(cache_dir, "work")
  if storage.is_uri(cache_dir) or not os.path.isdir(work):
    return None, None
  for name in sorted(os.listdir(work)):
    if name.endswith(".safetensors") and ".tmp." not in name:
      with open(os.path.join(work, name), "rb") as f:  # safetensors: u64 header length, then the JSON header
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
      return header.get("__metadata__", {}).get("hash"), None
  return None, None


def set_aside(config, log) -> None:
  """Make `data.cache_dir` hold the scored cache of THIS config's inputs, destroying nothing (the train and score
  commands, before `tregjax.score.run`).

  A cache there of other inputs (finished, or half-scored) is moved to the sibling `<cache_dir>.h<its hash[:16]>`,
  with a line naming what changed (data, prompts, model, ...) and where it went: it may hold hours of scoring. A
  sibling of THIS config's hash (set aside by an earlier switch) is moved back, so switching back to earlier data or
  prompts rescores nothing. A cache of other inputs on object storage (gs://...) cannot be moved in one step: it is
  refused in one line (StaleCacheError), as the trainer refuses a cache it is pointed at without data.train_files.
  """
  cache_dir = str(config.data.cache_dir).rstrip("/")
  if not cache_dir:
    return
  expected_components = cache_components(config)
  expected = hashing.hash_json(expected_components)
  found, components = _found_digest(cache_dir)
  if found is not None and found != expected:
    if components is None:
      what = "an unfinished scored cache of other inputs"
    else:
      changed = sorted(k for k in set(components) | set(expected_components)
                       if components.get(k) != expected_components.get(k))
      what = f"a scored cache of other inputs (changed: {'; '.join(COMPONENT_KEYS.get(k, k) for k in changed)})"
    if storage.is_uri(cache_dir):
      raise errors.StaleCacheError(f"{cache_dir} holds {what}; on object storage it is not moved aside: set "
                                   f"data.cache_dir to a new directory (or delete this one)")
    aside, n = f"{cache_dir}.h{found[:16]}", 1
    while os.path.exists(aside):
      n += 1
      aside = f"{cache_dir}.h{found[:16]}-{n}"
    storage.move_dir(cache_dir, aside)
    log.warning("%s held %s: moved it to %s (kept whole; these inputs again find it there) and scoring into %s",
                cache_dir, what, aside, cache_dir)
  earlier = f"{cache_dir}.h{expected[:16]}"
  if not storage.is_uri(cache_dir) and not os.path.exists(cache_dir) and os.path.isdir(earlier) \
      and _found_digest(earlier)[0] == expected:
    storage.move_dir(earlier, cache_dir)
    log.warning("reusing the scored cache of these inputs set aside earlier: moved %s back to %s", earlier,
                cache_dir)


# ------------------------------------------------------------------------------------ a cache on object storage


def staging_root() -> str:
  """Where a cache on object storage is staged on this host: scored into (`tregjax.score`) and copied down to for
  reading (the trainer: grain reads array_record files by random access, from a POSIX path).
  $TREGJAX_STAGING_DIR, else `hashing.cache_dir()/staging`. Entries are keyed by the cache's hash."""
  return os.environ.get("TREGJAX_STAGING_DIR") or os.path.join(hashing.cache_dir(), "staging")


def staged_path(digest: str, kind: str = "cache") -> str:
  """`<staging_root>/<kind>-<digest[:16]>`: 'score' while scoring, 'cache' for a finished copy."""
  return os.path.join(staging_root(), f"{kind}-{digest[:16]}")


def upload(staged: str, cache_dir: str) -> None:
  """Copy a finished cache scored into `staged` to `cache_dir` (object storage), `cache_meta.json` LAST: a torn
  upload has no marker, so the trainer refuses it as unfinished and a rerun of the scorer uploads it again. The work
  shards stay behind; the staged copy becomes this host's `staged_path(hash)` for a trainer here."""
  storage.copy_tree(staged, cache_dir, last=CACHE_META, skip=("work",))
  digest = storage.read_json(os.path.join(staged, CACHE_META))["hash"]
  shutil.rmtree(os.path.join(staged, "work"), ignore_errors=True)
  target = staged_path(digest)
  if os.path.exists(target):
    shutil.rmtree(staged)
  else:
    storage.move_dir(staged, target)


def local_copy(cache_dir: str) -> str:
  """The finished scored cache `cache_dir` as a local directory: itself when local; for a URI, this host's copy
  under `staging_root()`, keyed by the cache's hash (copied down on first use, `cache_meta.json` last and the whole
  copy appearing by one rename, so a torn copy is never used). A URI without `cache_meta.json` (unfinished, or an
  upload torn before its marker) is refused like a local one: StaleCacheError."""
  if not storage.is_uri(cache_dir):
    return cache_dir
  marker = storage.join(cache_dir, CACHE_META)
  if not storage.exists(marker):
    raise unfinished(cache_dir)
  digest = storage.read_json(marker)["hash"]
  target = staged_path(digest)

  def current() -> bool:
    path = os.path.join(target, CACHE_META)
    return os.path.exists(path) and storage.read_json(path).get("hash") == digest

  if current():
    return target
  _set_aside_if_stale(target, current)
  try:
    with storage.atomic_dir(target) as tmp:  # a fresh temporary next to `target`, unique to this process
      storage.copy_tree(cache_dir, tmp, last=CACHE_META, skip=("work",))
      if storage.read_json(os.path.join(tmp, CACHE_META)).get("hash") != digest:
        raise errors.StaleCacheError(f"{cache_dir} was rewritten while it was being copied to {target}; rerun")
  except OSError:
    # Another process of this host (two jax processes per host, say) renamed its whole copy into place first: the
    # rename onto a non-empty directory failed, atomic_dir deleted this copy; use the winner's, marker checked.
    if not current():
      raise
  return target


def _set_aside_if_stale(target: str, current) -> None:
  """Remove `target` unless it is a finished copy of this cache (`current()`): a copy of another cache under a
  colliding prefix, or one left half by hand. It is first renamed to a unique name, so another process that just
  renamed a good copy into place and checked it (`current()` true here) never loses it to an rmtree, and two
  processes removing the same stale copy do not collide."""
  if not os.path.exists(target) or current():
    return
  aside = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.stale.{os.getpid()}.{secrets.token_hex(4)}")
  try:
    storage.move_dir(target, aside)
  except FileNotFoundError:
    return  # another process set it aside first
  shutil.rmtree(aside, ignore_errors=True)
