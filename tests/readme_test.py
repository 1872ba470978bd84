"""The README keeps its promises: the two set-up commands come first; the your-data quickstart runs as written (its
placeholders filled with a tiny HF model and a tiny JSONL holding the README's own example record, plus CPU sizes)
and export gives a model transformers loads, with trained weights; the losses snippet runs; every install line names
files and extras that exist; every figure it quotes is in bench/RESULTS.md; every file it names exists; and
docs/configuration.md is what tregjax/config_schema.py generates."""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np

from conftest import REPO_ROOT


def _readme() -> str:
  with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
    return f.read()


def _section(title: str) -> str:
  return _readme().split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _prose() -> str:
  return re.sub(r"```.*?```", "", _readme(), flags=re.S)


def test_readme_opens_with_the_two_commands():
  first_block = re.search(r"```bash\n(.*?)```", _readme(), re.S).group(1).strip().splitlines()
  assert first_block == [
      "pip install -r requirements.txt && python -m tregjax.train --config configs/demo.py",
      "pip install -r requirements-test.txt && python -m pytest -q",
  ]


def losses_snippet() -> str:
  return re.search(r"```python\n(.*?)```", _section("Use the losses in your own JAX code"), re.S).group(1)


def test_losses_snippet_runs_and_gives_a_finite_loss(capsys):
  namespace = {}
  exec(compile(losses_snippet(), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert np.isfinite(float(namespace["loss"]))
  assert set(namespace["metrics"]) >= {"loss/total", "loss/regularizer", "weight/mean", "rewards/accuracy"}


def test_your_data_quickstart_runs_as_written_and_export_gives_a_trained_model(tmp_path):
  import torch  # the golden side: transformers loads what export wrote
  from transformers import AutoModelForCausalLM, AutoTokenizer
  import data_common as dc
  import my_data_test
  import train_common as tc

  section = _section("Your data, one command, then export")
  record = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))
  commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
  tok = AutoTokenizer.from_pretrained(dc.byte_level_bpe(str(tmp_path / "tok")))
  model_dir = my_data_test.hf_llama(str(tmp_path / "model"), tok, len(tok))
  dc.write_jsonl(str(tmp_path / "pairs.jsonl"), [record] + dc.pair_records(19, seed=5))
  os.symlink(os.path.join(REPO_ROOT, "configs"), tmp_path / "configs")  # the commands run as from a checkout
  for command in commands:
    command = command.replace("MODEL_DIR", model_dir)
    args = shlex.split(command)
    assert args[:2] == ["python", "-m"] and args[2] in ("tregjax.train", "tregjax.export"), command
    if args[2] == "tregjax.train":  # CPU sizes for a 2-layer model; the rest is the template's
      args += [f"--config.{k}={v}" for k, v in my_data_test.TINY.items()]
    proc = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, env=dict(tc.worker_env(), PYTHONPATH=REPO_ROOT),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-4000:]}"
  run = tmp_path / "runs" / "mine"
  records = [json.loads(line) for line in open(run / "metrics.jsonl", encoding="utf-8")]
  train = [r for r in records if "loss/total" in r]
  assert [r["step"] for r in train] == [1, 2, 3] and all(r["loss/regularizer"] != 0 for r in train)  # T-REG is on
  assert any("eval/loss/total" in r for r in records)  # the held-out 5% (the test's 20%) is evaluated
  with open(tmp_path / "runs" / "my_data_cache" / "scored" / "cache_meta.json", encoding="utf-8") as f:
    meta = json.load(f)  # the scoring pass ran as a stage of the train command
  assert meta["token_reward_source"] == "contrastive" and sum(meta["records"].values()) == 20
  hf = AutoModelForCausalLM.from_pretrained(str(run / "hf"), dtype=torch.float32)
  ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  assert AutoTokenizer.from_pretrained(str(run / "hf")).get_vocab() == tok.get_vocab()
  moved = max(float((a - b).detach().abs().max()) for a, b in zip(hf.parameters(), ref.parameters()))
  assert moved > 1e-4  # the export holds trained weights, not the reference's
  with torch.no_grad():
    assert torch.isfinite(hf(torch.arange(1, 17)[None]).logits).all()


def test_install_lines_name_files_and_extras_that_exist():
  import tomllib
  with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
    extras = set(tomllib.load(f)["tool"]["setuptools"]["dynamic"]["optional-dependencies"])
  lines = [l for l in re.search(r"```bash\n(.*?)```", _section("Install"), re.S).group(1).splitlines() if l]
  assert len(lines) == 4
  for line in lines + re.findall(r'pip install "?\.\[[\w,]+\]"?', _prose()):
    for path in re.findall(r"-r (\S+)", line):
      assert os.path.exists(os.path.join(REPO_ROOT, path)), line
    for names in re.findall(r"\.\[([\w,]+)\]", line):
      assert set(names.split(",")) <= extras, line


def test_every_figure_the_readme_quotes_is_in_bench_results():
  with open(os.path.join(REPO_ROOT, "bench", "RESULTS.md"), encoding="utf-8") as f:
    results = f.read()
  prose = re.sub(r"Python \d+\.\d+|\]\([^)]*\)", "", _prose())  # versions and link targets are not figures
  figures = re.findall(r"[+−]?\d+\.\d{2,}(?:×)?(?: \[[−+]?\d+\.\d+, [−+]?\d+\.\d+\])?", prose)
  assert len(figures) >= 6
  missing = [f for f in figures if f not in results and f.lstrip("+") not in results]
  assert not missing, f"README figures not in bench/RESULTS.md: {missing}"


def test_every_file_and_link_the_readme_names_exists():
  text = _readme()
  named = set(re.findall(r"(?<![\w/])((?:configs|launch|docs|bench|tregjax|tests|\.ci)/[\w./-]*\w)", text))
  named |= {link for link in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in link}
  assert len(named) > 10
  missing = sorted(n for n in named if not os.path.exists(os.path.join(REPO_ROOT, n)))
  assert not missing, missing
  for module in set(re.findall(r"python -m (tregjax\.\w+)", text)):
    assert os.path.exists(os.path.join(REPO_ROOT, *module.split(".")) + ".py"), module


def test_configuration_reference_is_generated_from_the_schema():
  from tregjax import config_schema
  with open(os.path.join(REPO_ROOT, "docs", "configuration.md"), encoding="utf-8") as f:
    assert f.read() == config_schema.reference_markdown(), \
        "docs/configuration.md is stale: python -m tregjax.config_schema > docs/configuration.md"
  reference = config_schema.reference_markdown()
  for key in ("data.train_files", "data.eval_split", "score.better_instruction", "logging.wandb.project",
              "generate.num_samples", "model.lora.rank", "mesh.fsdp"):
    assert f"| `{key}` |" in reference, key
  # Every key says what it does: a key added without a comment in config_schema.py leaves its cell empty.
  rows = [line.split(" | ") for line in reference.splitlines() if line.startswith("| `")]
  assert len(rows) > 100 and not [row[0] for row in rows if not row[2].strip(" |")], \
      "keys without a meaning in docs/configuration.md: comment them in tregjax/config_schema.py"
