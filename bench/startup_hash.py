"""Start-up cost of the model's cache key on a Meta-style HF directory that also holds a large file no loader reads.

    python bench/startup_hash.py [--weights_mb 512] [--unused_mb 3072] [--repeats 3]

score and train compute the model's key on every start, on every host (`scored_cache.cache_components`). Before:
sha256 of the whole directory (`hashing.hash_path(dir)`, still what a non-model directory gets), so Meta's
original/consolidated.00.pth (16 GB beside the 16 GB of safetensors for Llama-3-8B) was read too. After:
`hashing.model_hash`, only config, tokenizer and the index's shards, each file's sha256 memoised per (path, size,
mtime, inode); "cold" is a first start (empty memo), "warm" every later one. Files are freshly written, so every read
is served from the page cache: on a cold disk or a network mount the "before" column costs far more.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import common


def _write(path: str, mb: int) -> None:
  block = os.urandom(1 << 20)
  with open(path, "wb") as f:
    for _ in range(mb):
      f.write(block)
  os.utime(path, (1_600_000_000, 1_600_000_000))  # old: memoisable (see hashing._RACY_S)


def make_dir(root: str, weights_mb: int, unused_mb: int) -> str:
  d = os.path.join(root, "Meta-Llama-3-8B-Instruct")
  os.makedirs(os.path.join(d, "original"))
  shards = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
  for name in shards:
    _write(os.path.join(d, name), weights_mb // 2)
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {"a": shards[0], "b": shards[1]}}, f)
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    with open(os.path.join(d, name), "w") as f:
      f.write("{}")
  _write(os.path.join(d, "original", "consolidated.00.pth"), unused_mb)
  return d


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--weights_mb", type=int, default=512)
  ap.add_argument("--unused_mb", type=int, default=3072)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  from tregjax.data import hashing  # pylint: disable=g-import-not-at-top
  root = tempfile.mkdtemp(prefix="startup_hash-")
  try:
    d = make_dir(root, a.weights_mb, a.unused_mb)
    times: dict[str, list[float]] = {"before": [], "cold": [], "warm": []}
    for r in range(a.repeats):
      t0 = time.perf_counter()
      hashing.hash_path(d)
      times["before"].append(time.perf_counter() - t0)
      os.environ["TREGJAX_CACHE_DIR"] = os.path.join(root, f"cache{r}")  # an empty memo: a host's first start
      t0 = time.perf_counter()
      cold = hashing.model_hash(d)
      times["cold"].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      warm = hashing.model_hash(d)
      times["warm"].append(time.perf_counter() - t0)
      assert cold == warm
  finally:
    shutil.rmtree(root)
  med = {k: statistics.median(v) for k, v in times.items()}
  rows = [["before: whole directory (hash_path)", f"{med['before']:.3f}", "1.0x"],
          ["after, first start (model_hash, empty memo)", f"{med['cold']:.3f}", f"{med['before'] / med['cold']:.1f}x"],
          ["after, later starts (memo hit)", f"{med['warm'] * 1e3:.2f} ms",
           f"{med['before'] / med['warm']:,.0f}x"]]
  text = common.table(["model key", "seconds (median)", "faster than before"], rows)
  print(text)
  print(f"wrote {common.write_json('startup_hash', dict(args=vars(a), times=times, device=common.machine()))}")
  cmd = f"python bench/startup_hash.py --weights_mb {a.weights_mb} --unused_mb {a.unused_mb} --repeats {a.repeats}"
  common.update_results("startup_hash", (
      f"## Start-up: the model's cache key reads only what the loader reads (#26)\n\n`{cmd}` ({common.today()}, "
      f"{common.machine()}; median of {a.repeats}). A Meta-style directory: {a.weights_mb} MB of safetensors in two "
      f"indexed shards + an unused original/consolidated.00.pth of {a.unused_mb} MB. Every read is from the page "
      f"cache (freshly written files), so on disk the 'before' row costs more.\n\n{text}\n\n"
      f"The first start still reads the weights once per host; later starts stat the files only. Llama-3-8B's "
      f"directory is 16 GB of safetensors + 16 GB of consolidated.00.pth: the first start reads half of what it did, "
      f"later ones none.\n"))


if __name__ == "__main__":
  main()
