"""The SmolLM2 arith experiment's sampling stage: main before #30's sampler vs today's, one run (#30).

    python bench/sampling_stage.py --workdir W [--prompts 48]

W: a configs/smollm2_arith.py workdir past its problems and reference stages (problems/train.jsonl, reference/hf).
Both variants sample the experiment's first `--prompts` training problems with configs/smollm2_arith.py's sampling
settings (arith.num_samples 5 per problem, max_new_tokens 96, temperature 0.8, top-p 1, stop at SmolLM2's EOS ids,
sample_batch_size 64 rows, float32), each in its own process (no compile shared), one after the other:

now     the stage itself: `generate.run` on the task's stage config (`ArithTask.generate_config`, what the runner
        calls), the task's oracle scorer included: model loading, prompts, sampling, scoring, records and pairs.
before  `bench/decode.py`'s `legacy_generate` (main's sampler before #30: every row prefilled, top-p by bisection +
        Gumbel noise over the whole vocabulary, a batch running until its last row ends) on the same prompt rows,
        grouped as main's generate did (shards of shard_size prompts; rows by prompt bucket in `sample_batch_size`
        batches, a short last batch padded to the compiled shape), after the same model loading (`generate.Sampler`).

Reported: wall and CPU seconds of each process's stage (imports excluded; compile included, as the stage pays it),
new tokens generated (the samplers draw different samples, so their EOS stops differ) and new tokens/s; the ratio; and
the extrapolation to the stage's full 192 problems x 5 = 960 responses (seconds x 960 / rows).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import common

FULL_ROWS = 960  # the experiment's 192 training problems x 5 samples


def _config():
  spec = importlib.util.spec_from_file_location("smollm2_arith", common.REPO / "configs" / "smollm2_arith.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def worker(a) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tregjax import generate, parallel  # pylint: disable=g-import-not-at-top
  from tregjax.data import build as data_build  # pylint: disable=g-import-not-at-top
  from tregjax.data.pipeline import bucket_of  # pylint: disable=g-import-not-at-top
  from tregjax.data.tokenize import ChatTokenizer  # pylint: disable=g-import-not-at-top
  from tregjax.tasks import arith_experiment  # pylint: disable=g-import-not-at-top

  if a.compile_cache:  # compiled programs from (and into) jax's persistent cache: see --compile-cache
    jax.config.update("jax_compilation_cache_dir", a.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  config = _config()
  task = arith_experiment.ArithTask(config)
  ref = os.path.join(a.workdir, "reference", "hf")
  out = os.path.join(a.scratch, f"samples_{a.variant}")
  stage = task.generate_config(config, ref, ref, a.problems, out, num_samples=int(task.a.num_samples),
                               temperature=float(task.a.temperature), batch_size=int(task.a.sample_batch_size))
  for row in arith_experiment.read_jsonl(a.problems):
    task.answers[row["prompt"][-1]["content"]] = int(row["answer"])
  jax.block_until_ready(jax.numpy.zeros(()))  # backend up before the clock
  t0, c0 = time.perf_counter(), _cpu()
  if a.variant == "now":
    generate.run(stage, scorer=arith_experiment.ArithScorer(task.answers))
    with open(os.path.join(out, generate.SUMMARY), encoding="utf-8") as f:
      summary = json.load(f)
    new_tokens, rows = int(summary["new_tokens"]), int(summary["samples"])
  else:
    import decode  # pylint: disable=g-import-not-at-top  (bench/decode.py: the sampler of main before #30)
    g = generate.generate_section(stage)
    mesh = parallel.mesh_from_config(stage, per_process=True)
    tok = ChatTokenizer(data_build.tokenizer_path(stage), data_build.data_section(stage).end_of_turn_token)
    prompts = generate.load_prompts(stage, tok, {})
    sampler = generate.Sampler(stage, g, mesh, tok)
    n, size, new_tokens, rows = int(g.num_samples), sampler.batch_size, 0, 0
    for shard in range(0, len(prompts), int(g.shard_size)):
      part = prompts[shard:shard + int(g.shard_size)]
      width = [bucket_of(len(part[r // n].ids), g.buckets, extend=True) for r in range(len(part) * n)]
      order = sorted(range(len(width)), key=lambda r: (width[r], r))  # noqa: B023
      start = 0
      while start < len(order):
        chunk = [r for r in order[start:start + size] if width[r] == width[order[start]]]
        start += len(chunk)
        ids = [list(part[r // n].ids) for r in chunk]
        ids += [ids[0]] * (size - len(ids))  # main's fixed batch shape
        _, lengths = decode.legacy_generate(sampler.model, ids, int(g.max_new_tokens),
                                            jax.random.fold_in(jax.random.key(int(g.seed)), shard // int(g.shard_size)),
                                            sampler.eos_ids, width[chunk[0]], float(g.temperature), float(g.top_p))
        new_tokens += int(np.asarray(lengths)[:len(chunk)].sum())
        rows += len(chunk)
  wall, cpu = time.perf_counter() - t0, _cpu() - c0
  print("RESULT " + json.dumps(dict(wall_s=wall, cpu_s=cpu, new_tokens=new_tokens, rows=rows)), flush=True)


def render(cold: dict, warm: dict | None = None) -> str:
  """The section: the cold run (compiles included), and with `warm` (the same command with a filled
  --compile-cache) the stage without its compiles and the extrapolation compile once + warm x 960 / rows."""
  rows = []
  for run, tag in ((cold, "compile included"), (warm, "compiled programs from the cache")):
    if not run:
      continue
    before = run["before"]
    for name, label in (("before", "main before #30 (bench/decode.py `legacy_generate`)"),
                        ("now", f"now: `generate.run`, the stage itself (main at {run['commit']})")):
      r = run[name]
      full = ""
      if warm and cold and run is warm:
        compile_s = max(cold[name]["wall_s"] - warm[name]["wall_s"], 0.0)
        full = f"{compile_s + warm[name]['wall_s'] * FULL_ROWS / warm[name]['rows']:.0f}"
      rows.append([label, tag, str(r["rows"]), f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['new_tokens']:,}",
                   f"{r['new_tokens'] / r['wall_s']:.0f}", f"{before['wall_s'] / r['wall_s']:.2f}x",
                   f"{(r['new_tokens'] / r['wall_s']) / (before['new_tokens'] / before['wall_s']):.2f}x", full])
  p = cold or warm
  warm_cmd = (f" (cold), then the same with `--compile-cache DIR` twice: once outside the timing slot to fill it, "
              f"once timed ({warm['date']})") if warm else ""
  return (f"### The SmolLM2 arith experiment's sampling stage, before and after #30\n\n"
          f"`python bench/sampling_stage.py --workdir W --prompts {p['prompts']}` ({p['date']}, {p['machine']})"
          f"{warm_cmd}. The experiment's first {p['prompts']} training problems x 5 samples = {p['before']['rows']} "
          f"rows of configs/smollm2_arith.py's sampling (max_new_tokens 96, temperature 0.8, top-p 1, stop at EOS, "
          f"sample_batch_size 64, float32), each variant in its own process, one after the other; wall and CPU "
          f"seconds of the stage, model loading included, imports not. The two samplers draw different samples, so "
          f"their new-token counts differ: tokens/s = new tokens / wall seconds. Full stage (the stage's 192 problems "
          f"x 5 = {FULL_ROWS} rows), extrapolated: the compiles once (cold - warm seconds) + warm seconds x "
          f"{FULL_ROWS} / rows.\n\n"
          + common.table(["sampler", "run", "rows", "wall s", "CPU s", "new tokens", "new tokens/s",
                          "speed vs before (s)", "vs before (tokens/s)", f"full stage ({FULL_ROWS} rows) s"], rows))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="runs/smollm2_arith", help="a smollm2_arith run past its reference stage")
  ap.add_argument("--prompts", type=int, default=24, help="the first N training problems (the stage has 192)")
  ap.add_argument("--variants", default="before,now")
  ap.add_argument("--compile-cache", default="",
                  help="a jax persistent compilation cache directory: run once (outside the timing slot) to fill it, "
                       "then again to time the stage without its compiles (the payload says which)")
  ap.add_argument("--render", action="store_true", help="rewrite the RESULTS section from bench/out/sampling_stage.json")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
  ap.add_argument("--problems", default="", help=argparse.SUPPRESS)
  ap.add_argument("--scratch", default="", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.worker:
    worker(a)
    return
  if a.render:
    warm = common.OUT_DIR / "sampling_stage_warm.json"
    md = render(json.loads((common.OUT_DIR / "sampling_stage.json").read_text()),
                json.loads(warm.read_text()) if warm.exists() else None)
    print(md)
    common.update_results("sampling_stage", md)
    return
  train = os.path.join(a.workdir, "problems", "train.jsonl")
  for path in (train, os.path.join(a.workdir, "reference", "hf")):
    if not os.path.exists(path):
      raise SystemExit(f"{path} is missing: run `python -m tregjax.train --config configs/smollm2_arith.py "
                       f"--workdir {a.workdir}` past its reference stage first")
  scratch = tempfile.mkdtemp(prefix="sampling-stage-")
  problems = os.path.join(scratch, "train.jsonl")
  with open(train, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()][:a.prompts]
  if len(lines) < a.prompts:
    raise SystemExit(f"--prompts {a.prompts}: {train} holds only {len(lines)} problems")
  with open(problems, "w", encoding="utf-8") as f:
    f.writelines(lines)
  payload = dict(prompts=a.prompts, machine=common.machine(), date=common.today(), compile_cache=bool(a.compile_cache),
                 commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=common.REPO, check=False).stdout.strip())
  for variant in a.variants.split(","):
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--workdir", a.workdir, "--problems", problems,
           "--scratch", scratch, "--compile-cache", a.compile_cache]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
      raise SystemExit(f"sampling_stage {variant} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    payload[variant] = json.loads(line[-1][len("RESULT "):])
    print(f"  {variant}: {payload[variant]}", flush=True)
  payload["load_avg"] = os.getloadavg()[0]
  if "before" not in payload or "now" not in payload:
    return
  common.write_json("sampling_stage_warm" if a.compile_cache else "sampling_stage", payload)
  cold = common.OUT_DIR / "sampling_stage.json"
  md = render(json.loads(cold.read_text()) if cold.exists() else None, payload) if a.compile_cache else render(payload)
  print(md)
  common.update_results("sampling_stage", md)


if __name__ == "__main__":
  main()
