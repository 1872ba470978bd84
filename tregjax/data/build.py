"""Local preference files -> tokenized TFDS dataset (array_record): `build_dataset(config) -> dataset dir`.

Config keys (`config.data`, defaults in `default_data_config()` = `tregjax.config_schema.data_defaults()`):
  train_files         list of local paths (JSONL, parquet, or `save_to_disk` directories of one split)
  validation_files    list of local paths; if empty, `validation_fraction` of the train records (chosen by a
                      deterministic hash of the record index) go to the validation split
  format              "auto" | "jsonl" | "parquet" | "hf_disk"
  schema              "pair" | "chat" | "ranked" (see tregjax.data.schema), with `fields` mapping names
  system_prompt       optional system message put before every prompt ("" = none)
  tokenizer           local tokenizer directory ("" = model.tokenizer_path, else model.hf_path when a directory:
                      `config_schema.tokenizer_dir`, the one lookup of every command)
  end_of_turn_token   appended to every response ("" = the template's end-of-turn marker, else EOS)
  max_prompt_length, max_length, truncation ("truncate" | "drop" | "error")
  on_bad_record       "error" (raise, naming file, line/record and field) | "skip" (count, report on the console)
  max_bad_fraction    with "skip": a split in which more than this fraction of the records read is bad is an error
                      (a file that is 40% garbage is not a dataset); 1.0 never stops
  dataset_dir         where the TFDS dataset is written (its TFDS data_dir)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections

from tregjax import config_schema
from tregjax.data import hashing, schema, sources, tfds_builder
from tregjax.data.tokenize import ChatTokenizer, TruncationOptions

DATASET_FORMAT_VERSION = 1
REPORTED_EXAMPLES = 3  # bad records quoted on the console (metadata.json keeps up to 20)

log = logging.getLogger("tregjax.data")


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` section with every key this module and the pipeline read (config_schema.data_defaults)."""
  return config_schema.data_defaults()


def data_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.data` over `default_data_config()`: keys the trainer's base_config lacks take their defaults here."""
  merged = default_data_config()
  given = config.get("data", None) or {}
  for key in given.keys():
    value = given[key]
    merged[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return merged


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
  """The tokenizer directory (`config_schema.tokenizer_dir`: data.tokenizer, model.tokenizer_path, model.hf_path when
  a directory), or a ValueError when the config names none."""
  path = config_schema.tokenizer_dir(config)
  if not path:
    raise ValueError("set data.tokenizer (or model.tokenizer_path / model.hf_path) to a local tokenizer directory")
  return path


def check_vocab(config: ml_collections.ConfigDict, model_or_config: Any, command: str) -> None:
  """Refuse a run whose tokenizer (data.tokenizer / model.tokenizer_path / model.hf_path) has more tokens than the
  model's embedding: an id past it reads garbage on an accelerator (NaN log-probs, silently) instead of failing.

  Nothing to check when the config names no tokenizer directory (a random-init model on synthetic batches).
  """
  try:
    path = tokenizer_path(config)
  except ValueError:
    return
  if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "tokenizer_config.json")):
    return
  import transformers  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top  (flax: only for a model)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  model_path = (config.get("model", None) or {}).get("hf_path", "") or "the config's model preset"
  models.check_tokenizer_vocab(tokenizer, model_or_config, where=f"{command}: tokenizer {path} with {model_path}")


def _in_validation(index: int, fraction: float) -> bool:
  return fraction > 0 and ((index * 2654435761) % 2**32) / 2**32 < fraction


class _Counts:
  """Per-split counters reported in the dataset metadata and on the console."""

  def __init__(self):
    self.c: dict[str, Any] = dict(records=0, examples=0, ties_skipped=0, dropped_too_long=0, truncated_prompts=0,
                                  truncated_responses=0, bad_records={}, bad_record_examples=[])

  def bad(self, err: sources.DataError) -> None:
    count_bad(self.c, err)


def count_bad(counts: dict[str, Any], err: sources.DataError) -> None:
  """Count a skipped record by kind and keep its `file:line: field: reason` (the first 20) for the report."""
  counts.setdefault("bad_records", {})
  counts["bad_records"][err.kind] = counts["bad_records"].get(err.kind, 0) + 1
  examples = counts.setdefault("bad_record_examples", [])
  if len(examples) < 20:
    examples.append(str(err))


def _bad_summary(counts: dict[str, Any]) -> str:
  bad = counts.get("bad_records", {})
  kinds = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
  first = "; ".join(counts.get("bad_record_examples", [])[:REPORTED_EXAMPLES])
  return f"{sum(bad.values())} bad ({kinds}); first: {first}" if bad else "0 bad"


def report(what: str, counts: dict[str, Any]) -> None:
  """What a build did with the records of `what` (a split, a prompt file list), on the console: a WARNING with the
  per-kind counts and the first few `file:line: field: reason` lines when records were skipped, else one INFO line."""
  cut = {k: counts.get(k, 0) for k in ("truncated_prompts", "truncated_responses", "dropped_too_long",
                                       "ties_skipped") if counts.get(k, 0)}
  line = f"{what}: {counts.get('records', 0)} records read, {counts.get('examples', 0)} used" + \
      "".join(f", {k.replace('_', ' ')} {v}" for k, v in cut.items())
  if counts.get("bad_records"):
    log.warning("%s; skipped %s", line, _bad_summary(counts))
  else:
    log.info("%s", line)


def check_usable(what: str, files: Sequence[str], counts: dict[str, Any], max_bad_fraction: float,
                 why_empty: str = "") -> None:
  """Stop with an error naming the files when nothing is usable or too much was skipped: an empty or all-bad input
  must not reach TFDS (whose error names no file), and a mostly-bad file must not pass as a smaller dataset."""
  records, used = counts.get("records", 0), counts.get("examples", 0)
  bad = sum(counts.get("bad_records", {}).values())
  names = ", ".join(files) or "(no files)"
  if used == 0:
    if why_empty:
      reason = why_empty
    elif not records:
      reason = "the files hold no records (empty, or blank lines only)"
    elif bad:
      reason = _bad_summary(counts)
    else:
      reason = "every record was skipped: " + ", ".join(f"{k.replace('_', ' ')} {counts[k]}" for k in (
          "ties_skipped", "dropped_too_long") if counts.get(k))
    raise sources.DataError(names, None, f"{what}: no usable records ({records} read; {reason})", "no_usable_records")
  if bad and bad > max_bad_fraction * records:
    raise sources.DataError(names, None, f"{what}: {bad} of {records} records are bad ({bad / records:.0%}), more "
                            f"than data.max_bad_fraction={max_bad_fraction}: {_bad_summary(counts)}; fix the data "
                            f"or raise data.max_bad_fraction", "too_many_bad_records")


def tokenize_pair(ex: schema.PreferenceExample, tok: ChatTokenizer, trunc: TruncationOptions, where: str,
                  fields: dict[str, str], counts: dict[str, Any] | None = None) -> dict[str, Any] | None:
  """Ids of one pair under the truncation policy; None when dropped; DataError when over budget with "error"."""
  counts = counts if counts is not None else {}
  prompt = tok.prompt_ids(ex.prompt)
  chosen, rejected = tok.response_ids(ex.chosen), tok.response_ids(ex.rejected)
  longest = max(len(chosen), len(rejected))
  over_prompt = len(prompt) > trunc.max_prompt_length
  over_total = len(prompt) + longest > trunc.max_length
  if over_prompt or over_total:
    if trunc.policy == "error":
      if over_prompt:
        raise sources.DataError(where, fields["prompt"], f"prompt has {len(prompt)} tokens, longer than the budget "
                                f"max_prompt_length={trunc.max_prompt_length}", "prompt_too_long")
      side = fields["chosen"] if len(chosen) >= len(rejected) else fields["rejected"]
      raise sources.DataError(where, side, f"prompt + response = {len(prompt) + longest} tokens, longer than "
                              f"max_length={trunc.max_length}", "too_long")
    if trunc.policy == "drop":
      counts["dropped_too_long"] = counts.get("dropped_too_long", 0) + 1
      return None
    if over_prompt:
      prompt = prompt[-trunc.max_prompt_length:]
      counts["truncated_prompts"] = counts.get("truncated_prompts", 0) + 1
    budget = trunc.max_length - len(prompt)
    for ids in (chosen, rejected):
      if len(ids) > budget:
        del ids[budget:]
        counts["truncated_responses"] = counts.get("truncated_responses", 0) + 1
  return dict(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected,
              prompt_messages=json.dumps(list(ex.prompt), ensure_ascii=False), example_id=ex.example_id)


def iter_tokenized(config: ml_collections.ConfigDict, split: str, tok: ChatTokenizer,
                   counts: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
  """The tokenized examples of one split, in file order (errors raise unless on_bad_record == "skip")."""
  d = data_section(config)
  if d.on_bad_record not in ("error", "skip"):
    raise ValueError(f"data.on_bad_record must be 'error' or 'skip', got {d.on_bad_record!r}")
  trunc = TruncationOptions(d.max_prompt_length, d.max_length, d.truncation)
  fields = dict(schema.DEFAULT_FIELDS, **dict(d.fields))
  tally = _Counts()
  if counts is not None:
    counts.clear()
    counts.update(tally.c)
    tally.c = counts
  c = tally.c
  if split == "train" or d.validation_files:
    files = list(d.train_files if split == "train" else d.validation_files)
    pick = (lambda i: not _in_validation(i, d.validation_fraction)) if split == "train" and not d.validation_files \
        else (lambda i: True)
  else:
    files = list(d.train_files)
    pick = lambda i: _in_validation(i, d.validation_fraction)  # noqa: E731
  for index, raw in enumerate(sources.read_all(files, d.format)):
    if not pick(index):
      continue
    c["records"] += 1
    try:
      if raw.error is not None:
        raise raw.error
      ex = schema.to_example(raw.value, raw.where, d.schema, fields, d.system_prompt)
      out = tokenize_pair(ex, tok, trunc, raw.where, fields, c)
    except schema.Tie:
      c["ties_skipped"] += 1
      continue
    except sources.DataError as err:
      if d.on_bad_record == "error":
        raise
      tally.bad(err)
      continue
    if out is not None:
      c["examples"] += 1
      yield out
  why_empty = ""
  if not c["records"] and split == "validation" and not d.validation_files:
    why_empty = (f"data.validation_fraction={d.validation_fraction} picked none of the train records; raise it or "
                 f"set data.validation_files")
  check_usable(f"split {split!r}", files, c, float(d.max_bad_fraction), why_empty)


def dataset_hash(config: ml_collections.ConfigDict) -> str:
  """Hash of everything a tokenized dataset depends on: data files, tokenizer files and the data config."""
  d = data_section(config)
  keys = ("format", "schema", "fields", "system_prompt", "end_of_turn_token", "max_prompt_length", "max_length",
          "truncation", "on_bad_record", "validation_fraction")
  return hashing.hash_json(dict(
      version=DATASET_FORMAT_VERSION, config={k: (d[k].to_dict() if hasattr(d[k], "to_dict") else d[k])
                                              for k in keys},
      train=hashing.hash_paths(d.train_files), validation=hashing.hash_paths(d.validation_files),
      tokenizer=hashing.tokenizer_hash(tokenizer_path(config))))


def splits_of(config: ml_collections.ConfigDict) -> list[str]:
  d = data_section(config)
  splits = list(config_schema.SPLITS)  # the one list of split names (training.config checks names against it)
  return splits if (d.validation_files or d.validation_fraction > 0) else splits[:1]


def build_dataset(config: ml_collections.ConfigDict) -> str:
  """Tokenize `config.data`'s files into a TFDS array_record dataset; returns the dataset directory.

  Reuses the directory when the same inputs were already built (the config name is their hash). Counts (records,
  examples, ties skipped, truncated, dropped, bad records by kind) are in the dataset's metadata.json and logged.
  """
  d = data_section(config)
  if not d.dataset_dir:
    raise ValueError("set data.dataset_dir (where the tokenized dataset is written)")
  if not d.train_files:
    raise ValueError("data.train_files is empty")
  tok = ChatTokenizer(tokenizer_path(config), d.end_of_turn_token)
  digest = dataset_hash(config)
  metadata: dict[str, Any] = dict(kind="tokenized", format_version=DATASET_FORMAT_VERSION, hash=digest,
                                  tokenizer=tokenizer_path(config), pad_id=tok.pad_id,
                                  end_of_turn_id=tok.end_of_turn_id, schema=d.schema, counts={},
                                  max_prompt_length=d.max_prompt_length, vocab_size=tok.vocab_size)

  def gen_for(split):
    def gen():
      counts: dict[str, Any] = {}
      metadata["counts"][split] = counts
      yield from iter_tokenized(config, split, tok, counts)
    return gen

  out = tfds_builder.write("tokenized", d.dataset_dir, "h" + digest[:16], {s: gen_for(s) for s in splits_of(config)},
                           metadata)
  meta = tfds_builder.read_metadata(out)
  for split, counts in meta.get("counts", {}).items():  # on every build (a reused dataset reports its counts too)
    files = list(d.validation_files if split == "validation" and d.validation_files else d.train_files)
    report(f"tokenized {split} split of {', '.join(files)}", counts)
    if d.on_bad_record == "skip":  # a reused dataset meets today's threshold too
      check_usable(f"split {split!r}", files, counts, float(d.max_bad_fraction))
  return out
