"""The optional Weights & Biases hook (config.logging.wandb), in wandb's offline mode: the run directory under the
workdir holds every scalar metrics.jsonl holds (train and eval steps), the config and the summary; W&B's server
address points at a closed loopback port, so a request would fail rather than leave the machine. Without the
package, the run stops at start-up with one line naming the extra."""

import glob
import json
import os
import subprocess
import sys

import pytest

import train_common as tc
from tregjax import cli, training

pytestmark = pytest.mark.filterwarnings("ignore")


def _records(run_dir: str) -> list:
  """Every record of the offline run's .wandb file: a 7-byte W&B header, then LevelDB's log format (32 KiB blocks of
  records with a 7-byte header: crc, length, type FULL/FIRST/MIDDLE/LAST) holding wandb's Record protos."""
  import struct
  from wandb.proto import wandb_internal_pb2
  (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  block, pos, payloads, pending = 32768, 7, [], b""
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind in (1, 2):  # FULL, FIRST
      pending = chunk
    elif kind in (3, 4):  # MIDDLE, LAST
      pending += chunk
    if kind in (1, 4):
      payloads.append(pending)
  out = []
  for payload in payloads:
    record = wandb_internal_pb2.Record()
    record.ParseFromString(payload)
    out.append(record)
  return out


def test_offline_run_holds_the_metrics_config_and_summary(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{__import__('conftest').free_port()}")  # nothing listens
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = tc.tiny_config(**{"train.steps": 4, "train.log_every": 2, "logging.jsonl": True})
  config.logging.wandb.update(project="tregjax-test", name="tiny", tags=("ci", "offline"))
  workdir = str(tmp_path / "run")
  evals = []

  def data(cfg, split, pi, pc):
    if split != cfg.data.train_split:
      evals.append(split)
    return tc.array_data(cfg, split, pi, pc)

  config.data.eval_split = "validation"
  result = training.run(config, workdir, data_factory=data)
  assert result.step == 4 and evals

  (run_dir,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
  records = _records(run_dir)
  history = {}
  for r in records:
    if r.WhichOneof("record_type") == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
      step = int(items.get("_step", r.history.step.num))
      history.setdefault(step, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    lines = [json.loads(l) for l in f]
  want = {}
  for line in lines:
    want.setdefault(line.pop("step"), {}).update(line)
  assert sorted(history) == sorted(want) == [2, 4]
  for step, scalars in want.items():
    for key, value in scalars.items():
      assert history[step][key] == pytest.approx(value, rel=1e-6), (step, key)
  assert "eval/loss/total" in history[4]

  run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
  uploaded = {i.key: json.loads(i.value_json) for i in run.config.update}
  uploaded.update({i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
                   for i in r.config.update})
  value = lambda v: v.get("value", v)  # noqa: E731  (wandb wraps config values as {"value": ...} in some records)
  assert value(uploaded["optimizer"])["lr"] == config.optimizer.lr
  assert value(uploaded["model"])["overrides"]["hidden_size"] == 32
  assert run.project == "tregjax-test" and run.display_name == "tiny" and list(run.tags) == ["ci", "offline"]
  summary = {}
  for r in records:
    if r.WhichOneof("record_type") == "summary":
      summary.update({i.key: json.loads(i.value_json) for i in r.summary.update})
  assert summary["stopped"] == "completed" and summary["step"] == 4


def test_without_wandb_installed_the_run_stops_at_start_up_naming_the_extra(tmp_path):
  # `import wandb` fails and importlib.util.find_spec("wandb") finds nothing, as without the package
  (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
  config = tmp_path / "c.py"
  config.write_text("import sys\nsys.path.insert(0, %r)\nimport train_common as tc\n"
                    "def get_config():\n  c = tc.tiny_config()\n  c.logging.wandb.project = 'p'\n"
                    "  c.data.cache_dir = %r\n  return c\n" % (os.path.dirname(__file__), str(tmp_path)))
  env = dict(tc.worker_env(), PYTHONPATH=os.pathsep.join([str(tmp_path), os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))]))
  proc = subprocess.run([sys.executable, "-m", "tregjax.train", f"--config={config}", f"--workdir={tmp_path / 'w'}"],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == cli.EXIT_CONFIG, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "tregjax.train: error: config.logging.wandb.project is set, but the wandb package is not installed: "
      "`pip install 'tregjax[wandb]'` (or `pip install wandb`)")
  assert not (tmp_path / "w").exists()
