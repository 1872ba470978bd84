"""Seconds from SIGKILL of one process of a 2-process job (gloo on CPU, joined as launch/local_multiprocess.sh joins
them) to the survivor's exit, for training and scoring, killing process 1 and killing process 0 (the coordinator);
a process that hangs (SIGSTOP: no collective fails) found by the heartbeat timeout (5 s); and how long a process whose peer never arrives waits (distributed.initialization_timeout_s=5).

    python bench/peer_loss.py

Uses the scenarios of tests/peer_loss_test.py (tiny Llama, the trainer test worker; `python -m tregjax.score` on
the scoring test's tiny HF models), which also check the one line, the exit status and the resume. On main before
issue 31 the survivor sat 87 s (training) / 93 s (scoring) in jax.distributed's shutdown barrier, then aborted (exit
134, a native stack dump).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from common import machine, table, today, update_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import peer_loss_test as plt  # noqa: E402
import score_test  # noqa: E402
import train_common as tc  # noqa: E402


class _Factory:
  """What the `world` fixture needs of pytest's tmp_path_factory."""

  def __init__(self, root: Path):
    self.root = root

  def mktemp(self, name: str) -> Path:
    path = self.root / name
    path.mkdir()
    return path


def main() -> None:
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    for victim in (1, 0):
      work = str(tmp / f"train{victim}")
      kept, seconds = plt.kill_training(work, str(tmp / f"train_logs{victim}"), victim=victim)
      rows.append(["train", f"process {victim}", f"{seconds:.1f}", f"{plt.cli.EXIT_PEER_LOST}",
                   f"checkpoint step {kept}"])
    for victim in (1, 0):
      kept, seconds = plt.hang_training(str(tmp / f"hang{victim}"), str(tmp / f"hang_logs{victim}"), victim=victim)
      rows.append(["train, hang (SIGSTOP; heartbeat timeout 5 s)", f"process {victim}", f"{seconds:.1f}",
                   f"{plt.cli.EXIT_PEER_LOST}", f"checkpoint step {kept}"])
    world = score_test.world.__wrapped__(_Factory(tmp))
    cache = tmp / "cache"
    config_file = plt.score_config_file(world, tmp, cache)
    for run, victim in enumerate((1, 0)):
      done, seconds = plt.kill_scoring(config_file, str(cache), str(tmp / f"score_logs{run}"), victim=victim)
      rows.append(["score", f"process {victim}", f"{seconds:.1f}", f"{plt.cli.EXIT_PEER_LOST}",
                   f"{done} of 6 shards"])
    procs, _ = plt.start(tc.worker_cmd(str(tmp / "alone"), **{"distributed.initialization_timeout_s": 5}),
                         str(tmp / "alone_logs"), only=[0])
    t0 = time.time()
    procs[0].wait(timeout=300)
    rows.append(["train, process 1 never started", "-", f"{time.time() - t0:.1f} (from start; timeout 5 s)",
                 f"{procs[0].returncode}", "-"])
  text = (f"Measured {today()} on {machine()}: `python bench/peer_loss.py` (one run each; the survivor of a scoring "
          "job first finishes the shard it is on). Main before #31: 87 s (training) / 93 s (scoring), then SIGABRT "
          "(exit 134) with a native stack dump.\n\n"
          + table(["command", "killed", "kill -> survivor exit (s)", "exit status", "kept"], rows))
  print(text)
  update_results("peer loss", "## peer loss\n\n" + text)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
