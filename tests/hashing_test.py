"""The model's cache key covers exactly the files the loader reads, and file hashes are memoised per (path, size,
mtime): goldens are hashlib over the bytes and the file lists written by hand."""

import hashlib
import json
import os

import pytest

from tregjax.data import hashing

OLD = 1_600_000_000  # an mtime far in the past: memoised (a just-written file is not, see hashing._RACY_S)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("TREGJAX_CACHE_DIR", str(tmp_path / "cache"))


def _write(path, data: bytes, mtime=OLD):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  os.utime(path, (mtime, mtime))


def _meta_dir(root, sharded: bool):
  """A Meta-style HF download: weights, tokenizer, and files the loader never reads."""
  d = str(root / "llama")
  _write(f"{d}/config.json", b'{"model_type": "llama"}')
  _write(f"{d}/tokenizer.json", b'{"vocab": 1}')
  _write(f"{d}/tokenizer_config.json", b"{}")
  _write(f"{d}/generation_config.json", b"{}")
  _write(f"{d}/README.md", b"readme")
  _write(f"{d}/original/consolidated.00.pth", b"\0" * 4096)
  _write(f"{d}/original/params.json", b"{}")
  if sharded:
    _write(f"{d}/model-00001-of-00002.safetensors", b"shard one")
    _write(f"{d}/model-00002-of-00002.safetensors", b"shard two")
    _write(f"{d}/model.safetensors.index.json", json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode())
    _write(f"{d}/stray.safetensors", b"not in the index")  # the loader reads the index's shards only
  else:
    _write(f"{d}/model.safetensors", b"the weights")
  return d


@pytest.mark.parametrize("sharded", [False, True])
def test_model_files_are_what_the_loader_reads(tmp_path, sharded):
  d = _meta_dir(tmp_path, sharded)
  got = sorted(os.path.relpath(f, d) for f in hashing.model_files(d))
  weights = (["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
             if sharded else ["model.safetensors"])
  assert got == sorted(["config.json", "tokenizer.json", "tokenizer_config.json", *weights])


@pytest.mark.parametrize("sharded", [False, True])
def test_model_hash_ignores_unread_files_and_follows_read_ones(tmp_path, sharded):
  d = _meta_dir(tmp_path, sharded)
  key = hashing.model_hash(d)
  for unread in ("original/consolidated.00.pth", "README.md", "generation_config.json"):
    _write(f"{d}/{unread}", b"changed", mtime=OLD + 7)
    assert hashing.model_hash(d) == key, unread
  if sharded:
    _write(f"{d}/stray.safetensors", b"changed", mtime=OLD + 7)
    assert hashing.model_hash(d) == key
  shard = "model-00002-of-00002.safetensors" if sharded else "model.safetensors"
  for read in ("config.json", "tokenizer.json", shard):
    with open(f"{d}/{read}", "rb") as f:
      before = f.read()
    _write(f"{d}/{read}", before[:-1] + b"X", mtime=OLD + 60)  # same size: only the mtime tells the memo
    changed = hashing.model_hash(d)
    assert changed != key, read
    _write(f"{d}/{read}", before)
    assert hashing.model_hash(d) == key, read


def test_file_hash_is_sha256_and_memoised(tmp_path, monkeypatch):
  data = os.urandom(1 << 20)
  path = str(tmp_path / "data.jsonl")
  _write(path, data)
  golden = hashlib.sha256(data).hexdigest()
  assert hashing.hash_path(path) == golden  # dataset keys (hash_paths of the data files) are unchanged
  assert hashing.hash_paths([path]) == hashlib.sha256(golden.encode() + b"\0").hexdigest()
  reads = []
  real = hashing.hash_file
  monkeypatch.setattr(hashing, "hash_file", lambda p, *a: reads.append(p) or real(p, *a))
  assert hashing.file_sha256(path) == golden
  assert not reads  # the memo answered: no byte read
  memos = os.listdir(tmp_path / "cache" / "file_hashes")
  assert len(memos) == 1
  # A corrupt memo is a re-read, not an error.
  with open(tmp_path / "cache" / "file_hashes" / memos[0], "w") as f:
    f.write("{not json")
  assert hashing.file_sha256(path) == golden and len(reads) == 1


def test_a_fresh_file_is_not_memoised(tmp_path):
  path = str(tmp_path / "w.safetensors")
  with open(path, "wb") as f:
    f.write(b"written just now")
  assert hashing.file_sha256(path) == hashlib.sha256(b"written just now").hexdigest()
  assert not os.path.exists(tmp_path / "cache" / "file_hashes")


def test_gguf_key_is_its_sha256(tmp_path):
  path = str(tmp_path / "m.gguf")
  _write(path, b"GGUF....")
  assert hashing.model_hash(path) == hashlib.sha256(b"GGUF....").hexdigest()


def test_missing_weights_and_paths(tmp_path):
  d = tmp_path / "empty"
  _write(str(d / "config.json"), b"{}")
  _write(str(d / "pytorch_model.bin"), b"pickle")
  with pytest.raises(FileNotFoundError, match="pickle checkpoints are refused"):
    hashing.model_hash(str(d))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hashing.model_hash(str(tmp_path / "nope"))
