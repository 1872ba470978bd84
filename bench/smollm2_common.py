"""Shared helpers of the SmolLM2 benchmarks: the model file, real prompts, timing, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

OUT_DIR = REPO / "bench" / "out"
RESULTS = REPO / "bench" / "RESULTS.md"

PROMPTS = [
    "What is 17 + 25?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into French and Spanish.",
    "What is the capital of Australia?",
    "Give me a short tip for learning to cook.",
    "Summarize the plot of Romeo and Juliet in one sentence.",
]


def gguf_path() -> Path:
  from tregjax import assets  # pylint: disable=g-import-not-at-top
  return assets.fetch("smollm2")


def chat_prompt_ids(n: int) -> list[list[int]]:
  """`n` real chat-formatted prompts (cycled), as token ids."""
  from tregjax.models.gguf import tokenizer_from_gguf  # pylint: disable=g-import-not-at-top
  tok = tokenizer_from_gguf(gguf_path())
  texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                   add_generation_prompt=True) for i in range(n)]
  return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def timed(fn, repeats: int) -> tuple[float, list[float]]:
  """Median wall seconds of `fn()` over `repeats` calls (fn must block until its result is ready)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def timed_interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, list[float]]]:
  """Median wall seconds of each (blocking) fn, measured round-robin so that all see the same machine load.

  The CPU here is shared; timing variant A for a minute and then B would compare two different loads.
  """
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: (statistics.median(ts), ts) for name, ts in times.items()}


def machine() -> str:
  """The CPU and its 1-minute load average (the machine is shared: a load above the core count skews timings)."""
  return (f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.processor() or platform.system()}), "
          f"load avg {os.getloadavg()[0]:.1f}")


def write_json(name: str, payload: dict) -> Path:
  OUT_DIR.mkdir(parents=True, exist_ok=True)
  path = OUT_DIR / f"{name}.json"
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(payload, indent=2, default=str))
  os.replace(tmp, path)
  return path


def update_results(section: str, markdown: str) -> None:
  """Replaces this benchmark's block in bench/RESULTS.md (between markers), or appends it."""
  begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
  block = f"{begin}\n{markdown.rstrip()}\n{end}\n"
  text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
  pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
  text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
  tmp = RESULTS.with_suffix(".md.tmp")
  tmp.write_text(text)
  os.replace(tmp, RESULTS)


def today() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def table(headers: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)
