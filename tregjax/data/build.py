"""Local preference files -> tokenized TFDS dataset (array_record): `build_dataset(config) -> dataset dir`.

Config keys (`config.data`, defaults in `default_data_config()`):
  train_files         list of local paths (JSONL, parquet, or `save_to_disk` directories of one split)
  validation_files    list of local paths; if empty, `validation_fraction` of the train records (chosen by a
                      deterministic hash of the record index) go to the validation split
  format              "auto" | "jsonl" | "parquet" | "hf_disk"
  schema              "pair" | "chat" | "ranked" (see tregjax.data.schema), with `fields` mapping names
  system_prompt       optional system message put before every prompt ("" = none)
  tokenizer           local tokenizer directory ("" = `config.model.path`)
  end_of_turn_token   appended to every response ("" = the template's end-of-turn marker, else EOS)
  max_prompt_length, max_length, truncation ("truncate" | "drop" | "error")
  on_bad_record       "error" (raise, naming file, line/record and field) | "skip" (count in the summary)
  dataset_dir         where the TFDS dataset is written (its TFDS data_dir)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import ml_collections

from tregjax.data import hashing, schema, sources, tfds_builder
from tregjax.data.tokenize import ChatTokenizer, TruncationOptions

DATASET_FORMAT_VERSION = 1


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` section with every key this module and the pipeline read (the trainer's config embeds it)."""
  return ml_collections.ConfigDict(dict(
      train_files=(), validation_files=(), validation_fraction=0.0, format="auto", schema="pair",
      fields=dict(schema.DEFAULT_FIELDS), system_prompt="", tokenizer="", end_of_turn_token="",
      max_prompt_length=256, max_length=512, truncation="truncate", on_bad_record="error", dataset_dir="",
      # pipeline (tregjax.data.pipeline.make_iterator)
      batch_size=8, buckets=(64, 128, 256, 512), packing=False, seed=0, num_workers=0, drop_remainder=True))


def data_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.data` over `default_data_config()`: keys the trainer's base_config lacks take their defaults here."""
  merged = default_data_config()
  given = config.get("data", None) or {}
  for key in given.keys():
    value = given[key]
    merged[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return merged


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
  """data.tokenizer, else model.tokenizer_path, else model.hf_path (the trainer's keys)."""
  model = config.get("model", None) or {}
  path = (data_section(config).tokenizer or model.get("tokenizer_path", "") or model.get("hf_path", "")
          or model.get("path", ""))
  if not path:
    raise ValueError("set data.tokenizer (or model.tokenizer_path / model.hf_path) to a local tokenizer directory")
  return path


def _in_validation(index: int, fraction: float) -> bool:
  return fraction > 0 and ((index * 2654435761) % 2**32) / 2**32 < fraction


class _Counts:
  """Per-split counters reported in the dataset metadata and the log."""

  def __init__(self):
    self.c: dict[str, Any] = dict(records=0, examples=0, ties_skipped=0, dropped_too_long=0, truncated_prompts=0,
                                  truncated_responses=0, bad_records={}, bad_record_examples=[])

  def bad(self, err: sources.DataError) -> None:
    self.c["bad_records"][err.kind] = self.c["bad_records"].get(err.kind, 0) + 1
    if len(self.c["bad_record_examples"]) < 20:
      self.c["bad_record_examples"].append(str(err))


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
  return ["train", "validation"] if (d.validation_files or d.validation_fraction > 0) else ["train"]


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
                                  end_of_turn_id=tok.end_of_turn_id, schema=d.schema, counts={})

  def gen_for(split):
    def gen():
      counts: dict[str, Any] = {}
      metadata["counts"][split] = counts
      yield from iter_tokenized(config, split, tok, counts)
    return gen

  out = tfds_builder.write("tokenized", d.dataset_dir, "h" + digest[:16], {s: gen_for(s) for s in splits_of(config)},
                           metadata)
  meta = tfds_builder.read_metadata(out)
  for split, counts in meta.get("counts", {}).items():
    logging.info("tokenized %s: %s", split, {k: v for k, v in counts.items() if k != "bad_record_examples"})
  return out
