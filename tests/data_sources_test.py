"""Sources, schemas, tokenization and the tokenized TFDS dataset (tregjax.data)."""

import json
import os
import sys

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
import data_common as dc  # noqa: E402

from tregjax import data  # noqa: E402
from tregjax.data import tfds_builder  # noqa: E402
from tregjax.data.sources import DataError  # noqa: E402
from tregjax.data.tokenize import ChatTokenizer, with_instruction  # noqa: E402


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  return {"bpe": dc.byte_level_bpe(str(root / "bpe")), "metaspace": dc.metaspace_unigram(str(root / "ms"))}


def _config(tmp_path, tok, files, **overrides):
  cfg = ml_collections.ConfigDict(dict(data=data.default_data_config()))
  cfg.data.train_files = [str(f) for f in files]
  cfg.data.tokenizer = tok
  cfg.data.dataset_dir = str(tmp_path / "ds")
  cfg.data.max_prompt_length = 200
  cfg.data.max_length = 400
  for k, v in overrides.items():
    cfg.data[k] = v
  return cfg


def _all(cfg, split="train"):
  counts = {}
  tok = ChatTokenizer(cfg.data.tokenizer, cfg.data.end_of_turn_token)
  return list(data.iter_tokenized(cfg, split, tok, counts)), counts


@pytest.mark.parametrize("kind", ["bpe", "metaspace"])
def test_ids_are_template_prompt_plus_separately_tokenized_response(tmp_path, tokenizers, kind):
  path = tokenizers[kind]
  hf = AutoTokenizer.from_pretrained(path)
  records = dc.pair_records(6, seed=1)
  f = dc.write_jsonl(str(tmp_path / "a.jsonl"), records)
  examples, counts = _all(_config(tmp_path, path, [f]))
  eot = hf.convert_tokens_to_ids("<|im_end|>" if kind == "bpe" else "</s>")
  assert counts["examples"] == 6
  for rec, ex in zip(records, examples):
    text = hf.apply_chat_template([{"role": "user", "content": rec["prompt"]}], tokenize=False,
                                  add_generation_prompt=True)
    assert list(ex["prompt_ids"]) == hf(text, add_special_tokens=False)["input_ids"]
    assert list(ex["chosen_ids"]) == hf(rec["chosen"], add_special_tokens=False)["input_ids"] + [eot]
    assert list(ex["rejected_ids"]) == hf(rec["rejected"], add_special_tokens=False)["input_ids"] + [eot]
    assert json.loads(ex["prompt_messages"]) == [{"role": "user", "content": rec["prompt"]}]


@pytest.mark.parametrize("kind", ["bpe", "metaspace"])
def test_response_ids_are_the_same_under_plain_and_instructed_prompts(tokenizers, kind):
  """The invariant T-REG relies on: a response's tokens do not depend on the context they follow."""
  tok = ChatTokenizer(tokenizers[kind])
  hf = AutoTokenizer.from_pretrained(tokenizers[kind])
  prompt = [{"role": "user", "content": "Explain why the sky is blue."}]
  response = tok.response_ids("Rayleigh scattering makes short wavelengths scatter more.")
  for instruction in ("", "Be helpful, correct, coherent and concise.", "Be unhelpful, incorrect, verbose."):
    msgs = with_instruction(prompt, instruction, "system") if instruction else prompt
    row = tok.prompt_ids(msgs) + response
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    n = len(hf(text, add_special_tokens=False)["input_ids"])
    assert row[n:] == response
    assert hf.decode(row[n:-1]) .strip() == "Rayleigh scattering makes short wavelengths scatter more."


def test_chat_schema_takes_prompt_from_conversation(tmp_path, tokenizers):
  conv = [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is two plus two?"}]
  rec = {"chosen": conv + [{"role": "assistant", "content": "four"}],
         "rejected": conv + [{"role": "assistant", "content": "five"}]}
  f = dc.write_jsonl(str(tmp_path / "b.jsonl"), [rec])
  (ex,), _ = _all(_config(tmp_path, tokenizers["bpe"], [f], schema="chat"))
  assert json.loads(ex["prompt_messages"]) == conv
  tok = ChatTokenizer(tokenizers["bpe"])
  assert list(ex["prompt_ids"]) == tok.prompt_ids(conv)
  assert list(ex["chosen_ids"]) == tok.response_ids("four")


def test_ranked_schema_picks_best_and_worst_and_counts_ties(tmp_path, tokenizers):
  recs = [dict(prompt="p1", all_generated_responses=["a", "b", "c"], all_rm_scores=[0.5, 2.0, -1.0]),
          dict(prompt="p2", all_generated_responses=["x", "y"], all_rm_scores=[1.0, 1.0]),
          dict(prompt="p3", all_generated_responses=["u", "v", "w"], all_rm_scores=[3, 3, 0])]
  f = dc.write_jsonl(str(tmp_path / "c.jsonl"), recs)
  examples, counts = _all(_config(tmp_path, tokenizers["bpe"], [f], schema="ranked"))
  tok = ChatTokenizer(tokenizers["bpe"])
  assert counts["ties_skipped"] == 1 and counts["examples"] == 2
  assert list(examples[0]["chosen_ids"]) == tok.response_ids("b")
  assert list(examples[0]["rejected_ids"]) == tok.response_ids("c")
  assert list(examples[1]["chosen_ids"]) == tok.response_ids("u")  # first of tied maxima
  assert list(examples[1]["rejected_ids"]) == tok.response_ids("w")


def test_parquet_and_save_to_disk_sources_read_like_jsonl(tmp_path, tokenizers):
  records = dc.pair_records(5, seed=2)
  j = dc.write_jsonl(str(tmp_path / "a.jsonl"), records)
  table = pa.Table.from_pylist(records)
  pq.write_table(table, str(tmp_path / "a.parquet"))
  # `datasets.Dataset.save_to_disk` layout: an arrow IPC stream + state.json listing it.
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  with pa.OSFile(str(hf_dir / "data-00000-of-00001.arrow"), "wb") as sink:
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table)
  (hf_dir / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
  want, _ = _all(_config(tmp_path, tokenizers["bpe"], [j]))
  for src in (tmp_path / "a.parquet", hf_dir):
    got, _ = _all(_config(tmp_path, tokenizers["bpe"], [src]))
    assert [e["chosen_ids"] for e in got] == [e["chosen_ids"] for e in want]
    assert [e["prompt_ids"] for e in got] == [e["prompt_ids"] for e in want]


BAD_CASES = [
    ("malformed_json", '{"prompt": "p", "chosen": "a",', None),
    ("missing_field", {"prompt": "p", "chosen": "a"}, "rejected"),
    ("bad_response", {"prompt": "p", "chosen": "", "rejected": "b"}, "chosen"),
    ("bad_response", {"prompt": "p", "chosen": "a", "rejected": 7}, "rejected"),
    ("same_response", {"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected"),
    ("prompt_too_long", {"prompt": "word " * 300, "chosen": "a", "rejected": "b"}, "prompt"),
]


@pytest.mark.parametrize("kind,bad,field", BAD_CASES)
def test_bad_record_error_names_file_line_and_field(tmp_path, tokenizers, kind, bad, field):
  good = dc.pair_records(2)
  f = dc.write_jsonl(str(tmp_path / "bad.jsonl"), [good[0], bad, good[1]])
  cfg = _config(tmp_path, tokenizers["bpe"], [f], truncation="error", max_prompt_length=64, max_length=200)
  with pytest.raises(DataError) as err:
    _all(cfg)
  assert err.value.kind == kind
  assert f"{f}:line 2" in str(err.value)
  if field:
    assert f"field {field!r}" in str(err.value)
  cfg.data.on_bad_record = "skip"
  cfg.data.max_bad_fraction = 0.5  # 1 bad of 3 (the default 0.1 stops such a file: bad_input_test.py)
  examples, counts = _all(cfg)
  assert len(examples) == 2 and counts["bad_records"] == {kind: 1}


def test_non_utf8_line_is_reported_and_skippable(tmp_path, tokenizers):
  f = tmp_path / "bytes.jsonl"
  good = [json.dumps(r).encode() for r in dc.pair_records(2)]
  f.write_bytes(good[0] + b"\n" + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n' + good[1] + b"\n")
  cfg = _config(tmp_path, tokenizers["bpe"], [f])
  with pytest.raises(DataError, match=r"bytes.jsonl:line 2: non-UTF-8"):
    _all(cfg)
  cfg.data.on_bad_record = "skip"
  cfg.data.max_bad_fraction = 0.5
  examples, counts = _all(cfg)
  assert len(examples) == 2 and counts["bad_records"] == {"non_utf8": 1}


def test_truncation_policies_cut_drop_and_count(tmp_path, tokenizers):
  tok = ChatTokenizer(tokenizers["bpe"])
  recs = [dict(prompt="word " * 40, chosen="the quick brown fox " * 10, rejected="no"),
          dict(prompt="short", chosen="ok", rejected="no")]
  f = dc.write_jsonl(str(tmp_path / "t.jsonl"), recs)
  full_prompt = tok.prompt_ids([{"role": "user", "content": recs[0]["prompt"]}])
  assert len(full_prompt) > 16
  cfg = _config(tmp_path, tokenizers["bpe"], [f], max_prompt_length=16, max_length=32, truncation="truncate")
  (long, short), counts = _all(cfg)
  assert list(long["prompt_ids"]) == full_prompt[-16:]  # keeps the end (the generation prompt)
  assert list(long["chosen_ids"]) == tok.response_ids(recs[0]["chosen"])[:16]
  assert counts["truncated_prompts"] == 1 and counts["truncated_responses"] == 1
  assert list(short["chosen_ids"]) == tok.response_ids("ok")
  cfg.data.truncation = "drop"
  examples, counts = _all(cfg)
  assert len(examples) == 1 and counts["dropped_too_long"] == 1


def test_dataset_roundtrips_through_tfds_array_record_with_splits_and_counts(tmp_path, tokenizers, capsys):
  records = dc.pair_records(30, seed=3) + [{"prompt": "p", "chosen": "x", "rejected": "x"}]
  f = dc.write_jsonl(str(tmp_path / "a.jsonl"), records)
  v = dc.write_jsonl(str(tmp_path / "v.jsonl"), dc.pair_records(4, seed=4))
  cfg = _config(tmp_path, tokenizers["metaspace"], [f], validation_files=[v], on_bad_record="skip")
  out = data.build_dataset(cfg)
  assert "Downloading" not in capsys.readouterr().out  # TFDS's banner: nothing is downloaded
  want, _ = _all(cfg)
  src = tfds_builder.data_source(out, "train")
  assert len(src) == 30 == len(want)
  for i in range(30):
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
      np.testing.assert_array_equal(src[i][key], np.asarray(want[i][key], np.int32))
  lengths = tfds_builder.lengths(out, "train")
  assert lengths[7, 0] == len(want[7]["prompt_ids"]) + len(want[7]["chosen_ids"])
  assert len(tfds_builder.data_source(out, "validation")) == 4
  meta = tfds_builder.read_metadata(out)
  assert meta["counts"]["train"]["bad_records"] == {"same_response": 1}
  assert meta["hash"] == data.dataset_hash(cfg)
  assert "tensorflow" not in sys.modules
  # A changed input lands in a new directory (the config name is the content hash).
  dc.write_jsonl(str(tmp_path / "a.jsonl"), records[:-2])
  assert data.build_dataset(cfg) != out


def test_validation_fraction_splits_records_disjointly_and_deterministically(tmp_path, tokenizers):
  records = dc.pair_records(40, seed=8)
  f = dc.write_jsonl(str(tmp_path / "a.jsonl"), records)
  cfg = _config(tmp_path, tokenizers["bpe"], [f], validation_fraction=0.25)
  train, _ = _all(cfg, "train")
  validation, _ = _all(cfg, "validation")
  ids = lambda xs: [x["example_id"] for x in xs]  # noqa: E731
  assert sorted(ids(train) + ids(validation), key=lambda w: int(w.rsplit(" ", 1)[1])) == \
      [f"{f}:line {i}" for i in range(1, 41)]
  assert 0 < len(validation) < 20 and ids(validation) == ids(_all(cfg, "validation")[0])
