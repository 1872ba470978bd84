"""Where a run's files go: a local path or a storage URI (gs://, s3://, az://, hf://), and THE one atomic write.

A URI is handled by etils.epath (fsspec: gcsfs for gs://) and never reaches os.path.abspath / os.makedirs / open,
which would turn `gs://b/run` into a local `./gs:/b/run`. Local paths keep the ordinary POSIX calls.

Atomic writes (`write_bytes`/`write_text`/`write_json`/`copy_file`; `atomic_file`/`atomic_path` for streaming
writers; `atomic_dir` for a local directory): the bytes go to a temporary sibling first (`.<name>.tmp.<pid>.<random>`), and only a complete temporary is
moved onto the final name -- `os.replace` after an fsync on a local disk, a server-side copy + delete of the
temporary object on object storage (a GCS object, like the copy's destination, appears only when whole: there is no
partially written object to read). So a reader sees the old contents or the whole new ones, never a torn write; a
process killed mid-write leaves at most a temporary whose name readers never open (`is_temporary`), which a later
writer may delete. A written file is 0644 (readable by others on a shared cluster; mkstemp alone makes it 0600).

Bad input found here is one line: a scheme with no backend installed names the scheme and the package
(`MissingBackendError`, exit status 3); a missing or unwritable bucket/directory names it (`StorageError`, 2), found
by `check_writable` before any training starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import tempfile
from typing import IO, Any, Iterator

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# The URI schemes etils.epath serves (through fsspec), and the import + pip name of each one's filesystem package.
BACKENDS: dict[str, tuple[str, str]] = {
    "gs": ("gcsfs", "gcsfs"),
    "s3": ("s3fs", "s3fs"),
    "az": ("adlfs", "adlfs"),
    "hf": ("huggingface_hub", "huggingface_hub"),
}
FILE_MODE = 0o644  # a written artefact is meant to be read by others (mkstemp alone makes it 0600)
_TMP_MARK = ".tmp."


class StorageError(ValueError):
  """A storage location that cannot be used: a bucket that does not exist, or one this process cannot write."""


class MissingBackendError(ValueError):
  """A URI whose scheme has no storage backend in this environment (names the scheme and the package)."""


def scheme(path: str | os.PathLike) -> str | None:
  """The URI scheme of `path` ('gs' for gs://b/x), None for a local path."""
  m = _SCHEME.match(os.fspath(path))
  return m.group(1).lower() if m else None


def is_uri(path: str | os.PathLike) -> bool:
  """True for a URI other than file:// (those go through epath, never os.*/open)."""
  return scheme(path) not in (None, "file")


def check_scheme(path: str | os.PathLike, what: str = "path") -> None:
  """Raise MissingBackendError (one line naming the scheme and the package to install) when `path` is a URI that
  this environment cannot read or write."""
  s = scheme(path)
  if s in (None, "file"):
    return
  if s not in BACKENDS:
    known = ", ".join(f"{k}://" for k in BACKENDS)
    raise MissingBackendError(f"{what} {os.fspath(path)}: no storage backend for the scheme {s}:// (tregjax writes "
                              f"{known} through etils.epath, or a local path)")
  module, package = BACKENDS[s]
  if importlib.util.find_spec(module) is None:
    raise MissingBackendError(f"{what} {os.fspath(path)}: the {s}:// scheme needs the {package} package, which is "
                              f"not installed: pip install {package}")


def local(path: str | os.PathLike) -> str:
  """A local path as given (file:// stripped); a URI unchanged. Never abspath on a URI."""
  p = os.fspath(path)
  return p[len("file://"):] if p.startswith("file://") else p


def resolve(path: str | os.PathLike, what: str = "path") -> str:
  """The location a run records: an absolute local path, or the URI as given (scheme checked)."""
  check_scheme(path, what)
  p = local(path)
  return p.rstrip("/") if is_uri(p) else os.path.abspath(p)


def join(base: str | os.PathLike, *parts: str) -> str:
  """`os.path.join` for a local base; '/'-joined for a URI (never a backslash, never abspath)."""
  base = local(base)
  if not is_uri(base):
    return os.path.join(base, *parts)
  return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def epath(path: str | os.PathLike):
  """An etils.epath.Path of `path` (scheme checked); for libraries that take one (Orbax)."""
  from etils import epath as epath_lib  # pylint: disable=g-import-not-at-top
  check_scheme(path)
  return epath_lib.Path(local(path))


def _fs(path: str):
  """The fsspec filesystem behind a URI (the one etils.epath uses)."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  check_scheme(path)
  return backend.fsspec_backend.fs(path)


def _fresh_fs(path: str):
  """The filesystem with its listing cache of `path` dropped: another process (a host, the trainer) may have written
  there since this one last listed it, and a stale listing would hide a new checkpoint or marker."""
  fs = _fs(path)
  fs.invalidate_cache(path)
  return fs


def makedirs(path: str | os.PathLike) -> None:
  """Create a directory and its parents (a no-op on object storage, where prefixes need no creation)."""
  p = local(path)
  if is_uri(p):
    check_scheme(p)
    return
  os.makedirs(p, exist_ok=True)


def exists(path: str | os.PathLike) -> bool:
  p = local(path)
  return _fresh_fs(p).exists(p) if is_uri(p) else os.path.exists(p)


def isdir(path: str | os.PathLike) -> bool:
  p = local(path)
  return _fresh_fs(p).isdir(p) if is_uri(p) else os.path.isdir(p)


def listdir(path: str | os.PathLike) -> list[str]:
  """Names (not paths) in a directory, sorted."""
  p = local(path)
  if is_uri(p):
    return sorted(os.path.basename(q.rstrip("/")) for q in _fresh_fs(p).ls(p, detail=False))
  return sorted(os.listdir(p))


def remove(path: str | os.PathLike) -> None:
  p = local(path)
  if is_uri(p):
    _fs(p).rm_file(p)
  else:
    os.remove(p)


def move_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Give a local directory a new name on the same file system: one rename, so it is never seen half moved (the
  scored cache set aside, `tregjax.data.scored_cache.set_aside`). Object storage has no such move: a URI is refused."""
  if is_uri(src) or is_uri(dst):
    raise StorageError(f"cannot move {src} to {dst}: object storage has no one-step directory move")
  os.rename(local(src), local(dst))


def read_bytes(path: str | os.PathLike) -> bytes:
  p = local(path)
  if is_uri(p):
    with _fs(p).open(p, "rb") as f:
      return f.read()
  with open(p, "rb") as f:
    return f.read()


def read_text(path: str | os.PathLike) -> str:
  return read_bytes(path).decode("utf-8")


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(read_bytes(path))


def is_temporary(name: str) -> bool:
  """A temporary of an atomic write (complete or torn): never read as a result, safe to delete once its writer is
  gone."""
  return _TMP_MARK in os.path.basename(name)


def _temporary_name(path: str) -> str:
  head, name = (path.rsplit("/", 1) if is_uri(path) else os.path.split(path))
  tmp = f".{name}{_TMP_MARK}{os.getpid()}.{secrets.token_hex(4)}"
  return f"{head}/{tmp}" if is_uri(path) else os.path.join(head, tmp)


def _write_chunks(f, data: bytes, chunk: int = 1 << 24) -> None:
  view = memoryview(data)
  for start in range(0, len(view), chunk):
    f.write(view[start:start + chunk])


def _move_into_place(tmp: str, path: str) -> None:
  """The one step that makes a write visible: a rename (local) or a server-side copy + delete (object storage)."""
  if is_uri(path):
    fs = _fs(path)
    fs.copy(tmp, path)
    fs.rm_file(tmp)
  else:
    os.replace(tmp, path)


def _fsync(path: str) -> None:
  """Flush a file's (or a directory's: its entries') data to the disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_dir(path: str) -> None:
  """Make a rename in `path` durable (a filesystem that cannot fsync a directory is left as it is)."""
  try:
    _fsync(path)
  except OSError:
    pass


@contextlib.contextmanager
def _temporary(path: str, mode: int) -> Iterator[str]:
  """The name of a fresh temporary sibling of `path` (local: created empty, 0600); when the block ends normally it
  is made durable (local: fsync, then `mode`) and moved onto `path`; when it raises, the temporary is deleted and
  the block's error re-raised. Every atomic write in this module goes through here."""
  if is_uri(path):
    fs, tmp = _fs(path), _temporary_name(path)
  else:
    fs = None
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}{_TMP_MARK}{os.getpid()}.")
    os.close(fd)
  try:
    yield tmp
    if fs is None:
      _fsync(tmp)
      os.chmod(tmp, mode)
    _move_into_place(tmp, path)
    if fs is None:
      _fsync_dir(os.path.dirname(os.path.abspath(path)))
  except BaseException:
    try:
      if fs is None:
        if os.path.exists(tmp):
          os.remove(tmp)
      elif fs.exists(tmp):
        fs.rm_file(tmp)
    except Exception:  # pylint: disable=broad-except  (the first error is the one to report)
      pass
    raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, file_mode: int = FILE_MODE) -> Iterator[IO]:
  """A file object (`mode` "wb" or "w") whose content appears at `path` (local or URI) only once the block ends
  without an error; for writers that stream (safetensors, a figure, a joined download). See the module docstring."""
  if mode not in ("wb", "w"):
    raise ValueError(f"mode: 'wb' or 'w', not {mode!r}")
  p = local(path)
  with _temporary(p, file_mode) as tmp:
    opener = _fs(p).open if is_uri(p) else open
    with opener(tmp, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
      yield f


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, file_mode: int = FILE_MODE) -> Iterator[str]:
  """A local file name to write in place of `path` (for a library that takes a file name, not a file object); it
  appears at `path` (local or URI) only once the block ends without an error."""
  p = local(path)
  if not is_uri(p):
    with _temporary(p, file_mode) as tmp:
      yield tmp
    return
  fd, staged = tempfile.mkstemp(prefix=f".{os.path.basename(p)}{_TMP_MARK}{os.getpid()}.")
  os.close(fd)
  try:
    yield staged
    with _temporary(p, file_mode) as tmp:  # streamed by the backend: a large file is never read into memory
      _fs(p).put_file(staged, tmp)
  finally:
    os.remove(staged)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, dir_mode: int = 0o755) -> Iterator[str]:
  """A fresh local directory to fill in place of `path` (which must not exist yet); it appears at `path`, whole, by
  one rename once the block ends without an error, and is deleted when the block raises. Local paths only."""
  p = local(path)
  if is_uri(p):
    raise ValueError(f"{p}: atomic_dir writes a local directory, not a URI")
  parent = os.path.dirname(os.path.abspath(p))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(p)}{_TMP_MARK}{os.getpid()}.")
  try:
    yield tmp
    os.chmod(tmp, dir_mode)
    os.replace(tmp, p)
    _fsync_dir(parent)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = FILE_MODE) -> None:
  """Write `data` to `path` atomically (see the module docstring): readers see the old file or all of `data`."""
  with atomic_file(path, "wb", file_mode=mode) as f:
    _write_chunks(f, data)


def write_text(path: str | os.PathLike, text: str, *, mode: int = FILE_MODE) -> None:
  write_bytes(path, text.encode("utf-8"), mode=mode)


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2, mode: int = FILE_MODE) -> None:
  """JSON with sorted keys and a final newline, written atomically."""
  write_text(path, json.dumps(value, indent=indent, sort_keys=True, default=str) + "\n", mode=mode)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, *, mode: int = FILE_MODE) -> None:
  """Copy a file (local or URI) to `dst` atomically; streamed in chunks from a local source."""
  s, d = local(src), local(dst)
  if not is_uri(s):
    if is_uri(d):  # local -> object storage: streamed by the backend (a 5 GB shard is never read into memory)
      with _temporary(d, mode) as tmp:
        _fs(d).put_file(s, tmp)
      return
    with atomic_file(d, "wb", file_mode=mode) as out, open(s, "rb") as inp:
      shutil.copyfileobj(inp, out, 1 << 24)
    return
  write_bytes(d, read_bytes(s), mode=mode)


def list_files(root: str | os.PathLike, skip: tuple[str, ...] = ()) -> list[str]:
  """'/'-separated relative names of the files under `root` (local or URI), sorted, without temporaries and without
  the top-level entries named in `skip`."""
  root = local(root)
  if is_uri(root):
    fs = _fresh_fs(root)
    base = fs._strip_protocol(root).rstrip("/")  # pylint: disable=protected-access
    names = [q[len(base) + 1:] for q in fs.find(base) if q.startswith(base + "/")]
  else:
    names = [os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
             for d, _, files in os.walk(root) for n in files]
  return sorted(n for n in names if not is_temporary(n) and n.split("/", 1)[0] not in skip)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, *, last: str, skip: tuple[str, ...] = ()) -> None:
  """Copy a directory (a local one to a URI, or a URI to a local one) file by file, each atomically, with `last` (the
  completion marker: a top-level file name) copied after every other file. A reader that trusts a directory only
  when it holds `last` never reads a torn copy as whole; a copy killed midway is redone by running it again.
  `skip`: top-level names left out (a job's work/). A local destination is filled in place: wrap it in
  `atomic_dir` to make it appear whole."""
  s, d = local(src), local(dst)
  names = list_files(s, skip)
  if last not in names:
    raise StorageError(f"{s}: no {last} to copy last (not a finished directory)")
  for name in [n for n in names if n != last] + [last]:
    source, target = join(s, *name.split("/")), join(d, *name.split("/"))
    if is_uri(s) and not is_uri(d):  # object storage -> local: streamed by the backend into the temporary
      with _temporary(target, FILE_MODE) as tmp:
        _fs(s).get_file(source, tmp)
    else:
      copy_file(source, target)


def bucket(path: str | os.PathLike) -> str | None:
  """'gs://b' for 'gs://b/run/x'; None for a local path."""
  p = local(path)
  if not is_uri(p):
    return None
  s = scheme(p)
  return f"{s}://{p[len(s) + 3:].split('/', 1)[0]}"


def check_writable(path: str | os.PathLike, what: str = "workdir") -> None:
  """Fail in one line, before any work starts, when `path` cannot be written: a URI's bucket that does not exist or
  that this process may not write, a local directory that cannot be created or written. Writes and deletes one
  small probe file under `path`."""
  check_scheme(path, what)
  p = local(path)
  probe_name = f".tregjax-write-probe{_TMP_MARK}{os.getpid()}.{secrets.token_hex(4)}"
  if is_uri(p):
    b = bucket(p)
    fs = _fs(p)
    try:
      found = fs.exists(b)
    except Exception as e:  # pylint: disable=broad-except  (403 and friends: report, in one line)
      raise StorageError(f"{what} {p}: the bucket {b} cannot be read ({type(e).__name__}: {_first_line(e)})") from e
    if not found:
      raise StorageError(f"{what} {p}: the bucket {b} does not exist (create it, or fix the {what})")
    probe = join(p, probe_name)
    try:
      with fs.open(probe, "wb") as f:
        f.write(b"probe")
      fs.rm_file(probe)
    except Exception as e:  # pylint: disable=broad-except
      raise StorageError(f"{what} {p}: the bucket {b} is not writable by this process "
                         f"({type(e).__name__}: {_first_line(e)})") from e
    return
  try:
    os.makedirs(p, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=p, prefix=probe_name)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise StorageError(f"{what} {p}: not a writable directory ({e.strerror or type(e).__name__})") from e


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:200] if text else ""


class TextLog:
  """A text file that grows by lines (metrics.jsonl). Locally an append-mode file flushed per line; on object
  storage, which cannot append, the whole text is rewritten atomically on each `flush` (a log is small)."""

  def __init__(self, path: str | os.PathLike):
    self.path = local(path)
    self._uri = is_uri(self.path)
    self._lines: list[str] = []
    self._file = None
    if self._uri:
      self._text = read_text(self.path) if exists(self.path) else ""
    else:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def write(self, text: str) -> None:
    if self._file is not None:
      self._file.write(text)
    else:
      self._lines.append(text)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    elif self._lines:
      self._text += "".join(self._lines)
      self._lines = []
      write_text(self.path, self._text)

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None
