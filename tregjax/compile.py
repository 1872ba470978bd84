"""A TPU pod dress rehearsal on a CPU host: AOT-compile the real training step and scoring forward for a topology.

    python -m tregjax.compile --config configs/x.py[:args] --topology v5e:16x16 [--what train,score] [--hbm_gib N]
    python -m tregjax.train --config configs/x.py --compile_only --topology v5e:16x16     # the same

MaxText's train_compile idea. libtpu (the optional `tpu` extra: `pip install -r requirements-tpu.txt`) compiles for a
topology it describes (`jax.experimental.topologies`) without any TPU: the trainer's own program
(`training.trainer.build`: the recipe's mesh, shardings, remat, optimizer, donation) is lowered from abstract shapes on
the topology's devices, with the micro-batch the recipe runs (`data.batch_size` pairs of the longest bucket,
`optimizer.grad_accum_steps` micro-steps). The scoring forward is the reference's row function of `tregjax.score` over
one host's devices (score splits its work by host), in `score.dtype`, at the rows its token budget gives the longest
bucket. Nothing is allocated and nothing runs; only `config.json` of `model.hf_path` is read (a directory holding just
that file is enough).

Printed per program: per-device argument, output, temp and total memory (XLA's buffer assignment for the TPU: the
figure the run would allocate), whether the total fits the chip's HBM (`training.metrics.ACCELERATORS`), the step's
FLOPs per device (the model's count, `training.metrics`, with its time at the chip's bf16 peak; XLA's static count of
the compiled HLO beside it, which counts the body of a loop, e.g. the micro-batch scan, once) and the compiled
collectives by kind (instructions in the HLO text; one inside a loop body counts once). Exit status 8 when a program
does not fit (`cli.EXIT_DOES_NOT_FIT`); a topology name libtpu does not know is one line listing those it knows.
libtpu is told it runs alone and on no cloud VM (TPU_SKIP_MDS_QUERY, TPU_WORKER_HOSTNAMES=localhost,
TPU_ACCELERATOR_TYPE), so it queries no metadata server; the host platform stays CPU (JAX_PLATFORMS=cpu unless set).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from tregjax import cli

log = logging.getLogger("tregjax.compile")

# Chip names libtpu's topology names start with (`<chip>:<AxB[xC]>`), tried when a name is refused so the error can list
# those this libtpu knows.
CHIPS = ("v2", "v3", "v4", "v5e", "v5p", "v6e", "TPU7x")
# TPU_ACCELERATOR_TYPE of a slice of N chips (libtpu reads it at start-up; TensorCores for v4/v5p, chips otherwise).
_ACCELERATOR_TYPE = {"v4": "v4-{cores}", "v5e": "v5litepod-{chips}", "v5p": "v5p-{cores}", "v6e": "v6e-{chips}"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
                 "generated_code_size_in_bytes")


class DoesNotFitError(ValueError):
  """A compiled program needs more memory per device than the chip has (exit status cli.EXIT_DOES_NOT_FIT)."""


def prepare_env(topology: str) -> None:
  """Before jax starts a backend: libtpu queries no metadata server, and the host platform stays CPU."""
  chip, _, shape = topology.partition(":")
  chips = math.prod(int(x) for x in shape.split("x") if x.isdigit()) if shape else 1
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                        _ACCELERATOR_TYPE.get(chip, "v5litepod-{chips}").format(chips=chips, cores=2 * chips))
  if "JAX_PLATFORMS" not in os.environ:
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # a config file imported jax already: its flag, not the environment, decides now
      sys.modules["jax"].config.update("jax_platforms", "cpu")


def topology_devices(topology: str) -> list[Any]:
  """The devices of a TPU topology (`v5e:4x4`, `v5p:2x2x2`, ...), from libtpu; no TPU needed."""
  prepare_env(topology)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu raises JaxRuntimeError / RuntimeError)
    text = cli.one_line(e)
    if re.search(r"not installed|unknown backend|no.*plugin|libtpu", text, re.I) and not _libtpu_installed():
      raise MissingLibtpuError(
          "compiling for a TPU topology needs libtpu (the optional tpu extra): `pip install -r "
          "requirements-tpu.txt`") from e
    if "Invalid TPU external name" in text or "does not match regex" in text:
      raise ValueError(f"--topology={topology!r}: libtpu does not know this topology name; it knows "
                       f"{', '.join(known_chips())} as <chip>:<AxB> or <chip>:<AxBxC> (e.g. v5e:4x4, v5p:2x2x2)") from e
    raise ValueError(f"--topology={topology!r}: {text}") from e


class MissingLibtpuError(ImportError):
  """libtpu is not installed (exit status cli.EXIT_MISSING_PACKAGE)."""


def _libtpu_installed() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("libtpu") is not None


def known_chips() -> list[str]:
  """The CHIPS this libtpu accepts (a refused shape still names a known chip; an unknown chip is its own error)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  known = []
  for chip in CHIPS:
    try:
      topologies.get_topology_desc(platform="tpu", topology_name=f"{chip}:2x2x1")
    except Exception as e:  # pylint: disable=broad-except
      if "Invalid TPU external name" in str(e):
        continue
    known.append(chip)
  return known


@dataclasses.dataclass
class Report:
  """One compiled program on one topology: memory per device, FLOPs, collectives, and whether it fits."""
  program: str  # "train step" | "scoring forward"
  topology: str
  device_kind: str
  devices: int  # the devices the program spans
  mesh: dict[str, int]
  batch: str  # the shapes it was compiled for, in words
  memory: dict[str, int]  # MEMORY_FIELDS, bytes per device
  total_bytes: int  # argument + output - alias + temp + generated code
  hbm_bytes: float  # per device (a chip's HBM over the devices it shows as)
  flops: float  # per device, XLA's static count of the compiled HLO (a while loop's body counted once)
  model_flops: float  # per device, the model's count (6 N per token for the step, 4 N_base + 6 N_lora with LoRA; 2 N forward)
  peak_flops: float  # the device's bf16 peak FLOP/s (training.metrics.ACCELERATORS)
  collectives: dict[str, int]
  compile_s: float
  compiler_oom: str = ""  # libtpu refused to compile: its RESOURCE_EXHAUSTED message (memory then holds its figures)

  @property
  def fits(self) -> bool:
    return not self.compiler_oom and self.total_bytes <= self.hbm_bytes

  def lines(self) -> list[str]:
    m = self.memory
    coll = ", ".join(f"{k} {v}" for k, v in self.collectives.items() if v) or "none"
    verdict = "fits" if self.fits else "DOES NOT FIT"
    if self.compiler_oom:
      return [f"{self.program} on {self.topology} ({self.devices} x {self.device_kind}, mesh {self.mesh}; {self.batch})",
              f"  memory per device: DOES NOT FIT: libtpu refused to compile it: {self.compiler_oom}"]
    return [
        f"{self.program} on {self.topology} ({self.devices} x {self.device_kind}, mesh {self.mesh}; {self.batch}; "
        f"compiled in {self.compile_s:.1f}s)",
        f"  memory per device: argument {size(m['argument_size_in_bytes'])}, output "
        f"{size(m['output_size_in_bytes'])} (aliased with arguments {size(m['alias_size_in_bytes'])}), temp "
        f"{size(m['temp_size_in_bytes'])}, total {size(self.total_bytes)} of {size(self.hbm_bytes)} HBM: {verdict} "
        f"({100 * self.total_bytes / self.hbm_bytes:.0f}%)",
        f"  FLOPs per device: {self.model_flops:.3e} (model count; {self.model_flops / self.peak_flops:.3f} s at the "
        f"chip's bf16 peak); XLA's static count of the compiled HLO {self.flops:.3e} (a loop body counts once)",
        f"  collectives in the HLO: {coll}",
    ]

  def json(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), fits=self.fits)


def size(n: float) -> str:
  """Bytes as GiB (MiB below 1 GiB)."""
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def collectives(hlo_text: str) -> dict[str, int]:
  """Collective instructions by kind in a compiled module's HLO text (an async pair counts once, at its -start)."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for kind in _COLLECTIVE_RE.findall(hlo_text):
    counts[kind] += 1
  return counts


def _compile(lowered) -> tuple[Any, str]:
  """(the compiled program, "") or (None, libtpu's message) when the compiler itself finds it does not fit in HBM."""
  try:
    return lowered.compile(), ""
  except Exception as e:  # pylint: disable=broad-except  (jax.errors.JaxRuntimeError)
    if "RESOURCE_EXHAUSTED" in str(e) and "memory" in str(e):
      return None, cli.one_line(e).split("RESOURCE_EXHAUSTED: ", 1)[-1]
    raise


def _oom_bytes(message: str) -> tuple[int, float]:
  """(bytes required, bytes available) from libtpu's "... (50.71G) exceeds available HBM (15.75G)"."""
  found = re.findall(r"\(([0-9.]+)([KMGT])\)", message)
  scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  values = [float(v) * scale[u] for v, u in found]
  return (int(values[0]), values[1]) if len(values) >= 2 else (0, 0.0)


def _analyse(program: str, topology: str, devices: Sequence[Any], mesh, batch: str, compiled, model_flops: float,
             compile_s: float, hbm_bytes: float | None, oom: str = "") -> Report:
  from tregjax.training import metrics  # pylint: disable=g-import-not-at-top  (train's start: stdlib + cli only)
  kind = devices[0].device_kind
  peak = float(metrics.peak_flops_per_device(kind) or math.nan)
  if compiled is None:
    need, have = _oom_bytes(oom)
    return Report(program=program, topology=topology, device_kind=kind, devices=len(devices),
                  mesh={k: int(v) for k, v in mesh.shape.items()}, batch=batch,
                  memory=dict.fromkeys(MEMORY_FIELDS, 0) | {"temp_size_in_bytes": need}, total_bytes=need,
                  hbm_bytes=min(have, hbm_bytes or have) if have else 0.0, peak_flops=peak, flops=0.0,
                  model_flops=model_flops, collectives={}, compile_s=compile_s, compiler_oom=oom)
  mem = compiled.memory_analysis()
  memory = {k: int(getattr(mem, k, 0)) for k in MEMORY_FIELDS}
  total = (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"] - memory["alias_size_in_bytes"] +
           memory["temp_size_in_bytes"] + memory["generated_code_size_in_bytes"])
  if hbm_bytes is None:
    chip = metrics.chip_memory_bytes(kind)
    if chip is None:
      raise ValueError(f"no HBM size for device kind {kind!r} in training.metrics.ACCELERATORS; pass --hbm_gib")
    per_chip = len(devices) / len({tuple(d.coords) for d in devices})  # v2-v4 show each TensorCore as a device
    hbm_bytes = chip / per_chip
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Report(program=program, topology=topology, device_kind=kind, devices=len(devices),
                mesh={k: int(v) for k, v in mesh.shape.items()}, batch=batch, memory=memory, total_bytes=total,
                hbm_bytes=float(hbm_bytes), peak_flops=peak, flops=float((cost or {}).get("flops", 0.0)),
                model_flops=model_flops, collectives=collectives(compiled.as_text()), compile_s=compile_s)


def host_devices(topology: str, devices: Sequence[Any]) -> list[Any]:
  """One host's devices, as a topology of their own: score runs on each host's chips alone, and libtpu compiles for a
  whole slice only (a program over part of a multi-host v5e is refused), so a multi-host slice is replaced by the
  single-host slice its hosts are made of (v5e:16x16 -> v5e:2x2 in libtpu's default layout)."""
  if len({d.process_index for d in devices}) == 1:
    return list(devices)
  mine = [d for d in devices if d.process_index == devices[0].process_index]
  dims = [max(c) - min(c) + 1 for c in zip(*(d.coords for d in mine))]
  chip, _, shape = topology.partition(":")
  return topology_devices(f"{chip}:{'x'.join(str(x) for x in dims[:len(shape.split('x'))])}")


def longest_bucket(config) -> int:
  """The longest batch the trainer's pipeline makes: the bucket holding data.max_length."""
  from tregjax.data import pipeline  # pylint: disable=g-import-not-at-top  (train's start: stdlib + cli only)
  return pipeline.bucket_of(config.data.max_length, config.data.buckets)


def train_flops_per_token(program, seq_len: int) -> float:
  """Model FLOPs of one training token of `program` (a `trainer.Program`). Every matmul weight costs 2 FLOPs forward
  and 2 for the gradient of its input; only a weight that trains also costs 2 for its own gradient:

    6 · N_trained + 4 · N_frozen + 12 · L · n_heads · head_dim · T

  A full fine-tune is `training.metrics.train_flops_per_token` (6 · N + attention). A LoRA run trains the adapters
  only (`training.partition`): N_trained = the adapters' r · (d_in + d_out) per adapted projection and layer, the
  base's matmul weights are frozen (no weight gradient), so the count is the full one minus 2 · N_base plus 6 · N_lora.
  A `train.freeze` run without LoRA keeps the full count (an upper bound)."""
  import jax  # pylint: disable=g-import-not-at-top
  from tregjax.training import metrics  # pylint: disable=g-import-not-at-top  (train's start: stdlib + cli only)
  cfg = program.model_cfg
  full = metrics.train_flops_per_token(cfg, seq_len)
  if not cfg.lora_targets:
    return full
  adapters = sum(math.prod(x.shape) for x in jax.tree.leaves(program.target.params))
  return full - 2.0 * metrics.matmul_params(cfg) + 6.0 * adapters


def compile_train(config, topology: str, devices: Sequence[Any], hbm_bytes: float | None = None) -> Report:
  """The trainer's step (`training.trainer.build`) for a global batch of `data.batch_size` pairs of the longest
  bucket, on the mesh `config.mesh` makes of `devices`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tregjax import parallel  # pylint: disable=g-import-not-at-top  (train's start: stdlib + cli only)
  # train's start: stdlib + cli only:
  from tregjax.data.batch import PreferenceBatch, SequenceBatch  # pylint: disable=g-import-not-at-top
  # train's start: stdlib + cli only:
  from tregjax.training import metrics, trainer  # pylint: disable=g-import-not-at-top
  mesh = parallel.mesh_from_config(config, devices=devices)
  steps = config.train.steps if config.train.steps > 0 else 1000  # the schedule's length changes no shape
  program = trainer.build(config, mesh, total_steps=steps)
  b, t = int(config.data.batch_size), longest_bucket(config)

  def arr(dtype, *shape):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))

  def side():
    return SequenceBatch(tokens=arr(jnp.int32, b, t), labels=arr(jnp.int32, b, t), loss_mask=arr(jnp.float32, b, t),
                         segment_ids=arr(jnp.int32, b, t), positions=arr(jnp.int32, b, t))

  batch = PreferenceBatch(chosen=side(), rejected=side(), ref_chosen_logps=arr(jnp.float32, b),
                          ref_rejected_logps=arr(jnp.float32, b), ref_chosen_token_logps=arr(jnp.float32, b, t),
                          ref_rejected_token_logps=arr(jnp.float32, b, t),
                          chosen_token_rewards=arr(jnp.float32, b, t), rejected_token_rewards=arr(jnp.float32, b, t))
  t0 = time.perf_counter()
  with parallel.use_mesh(mesh):
    compiled, oom = _compile(program.train_step.lower(program.target, batch))
  compile_s = time.perf_counter() - t0
  accum = int(config.optimizer.grad_accum_steps)
  rows = 2 * b if config.objective != "sft" else b  # chosen + rejected rows in one forward (sft: chosen only)
  model_flops = train_flops_per_token(program, t) * rows * t / len(devices)
  desc = (f"{b} pairs x {t} tokens in {accum} micro-batch(es) of {b // accum}, remat={config.model.remat}, "
          f"{config.model.dtype} compute / {config.model.param_dtype} weights")
  return _analyse("train step", topology, devices, mesh, desc, compiled, model_flops, compile_s, hbm_bytes, oom)


def compile_score(config, topology: str, devices: Sequence[Any], hbm_bytes: float | None = None) -> Report:
  """The scoring pass's reference forward (`score.make_row_fn`) on one host's devices, in the score section's dtype,
  for the rows its token budget gives the longest bucket."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  # train's start: stdlib + cli only:
  from tregjax import config_schema, models, parallel, score  # pylint: disable=g-import-not-at-top
  from tregjax.data import pipeline  # pylint: disable=g-import-not-at-top  (train's start: stdlib + cli only)
  from tregjax.training import metrics  # pylint: disable=g-import-not-at-top  (train's start: stdlib + cli only)
  s = score.score_section(config)
  host = host_devices(topology, devices)
  mesh = parallel.mesh_from_config(config, per_process=True, devices=host)
  dtype = jnp.dtype(cli.compute_dtype(config, s))
  cfg = models.load_config(config_schema.model_path(config, "reference"))
  graphdef, state = nnx.split(models.abstract_model(cfg, dtype=dtype, param_dtype=dtype))
  state_sh = parallel.state_shardings(state, mesh)
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  t = pipeline.bucket_of(config.data.max_length, s.buckets, extend=True)
  rows = score.batch_rows(s, ways, score.batch_tokens(s, ways, "tpu"), t)
  fn = jax.jit(score.make_row_fn("logps", graphdef, pad_id=0, chunk_size=s.chunk_size),
               in_shardings=(state_sh, parallel.batch_sharding(mesh, 2), parallel.batch_sharding(mesh, 2),
                             parallel.batch_sharding(mesh, 1)))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  t0 = time.perf_counter()
  with parallel.use_mesh(mesh):
    compiled, oom = _compile(fn.lower(abstract, jax.ShapeDtypeStruct((rows, t), jnp.int32),
                                      jax.ShapeDtypeStruct((rows, t), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.int32)))
  compile_s = time.perf_counter() - t0
  model_flops = metrics.forward_flops_per_token(cfg, t) * rows * t / len(host)
  desc = f"{rows} rows x {t} tokens on one host ({len(host)} of {len(devices)} devices), {dtype.name} weights"
  return _analyse("scoring forward", topology, host, mesh, desc, compiled, model_flops, compile_s, hbm_bytes, oom)


def run(config, topology: str, what: Sequence[str] = ("train", "score"), hbm_gib: float | None = None,
        out=print, json_out: str = "") -> list[Report]:
  """Compile `what` for `topology`, print each report (and write them to `json_out`); DoesNotFitError (after
  printing) when any does not fit."""
  # train's start: stdlib + cli only:
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  devices = topology_devices(topology)
  config_lib.validate(config, check_data=False, num_devices=len(devices))
  hbm = None if hbm_gib is None else hbm_gib * 2.0 ** 30
  compilers = {"train": compile_train, "score": compile_score}
  unknown = [w for w in what if w not in compilers]
  if unknown:
    raise ValueError(f"--what={','.join(what)}: unknown {unknown}; choose from {sorted(compilers)}")
  reports = []
  for w in what:
    if w == "score" and not config.model.hf_path:
      out("scoring forward: skipped (model.hf_path is empty: a random-init run has no reference to score)")
      continue
    report = compilers[w](config, topology, devices, hbm)
    for line in report.lines():
      out(line)
    reports.append(report)
    if json_out:  # after each program: a later one that crashes the compiler leaves the earlier ones' reports
      with open(json_out, "w", encoding="utf-8") as f:
        json.dump([r.json() for r in reports], f, indent=2)
  bad = [r for r in reports if not r.fits]
  if bad:
    raise DoesNotFitError("; ".join(
        f"the {r.program} needs {r.total_bytes / 2**30:.2f} GiB per device on {topology}, more than the "
        f"{r.hbm_bytes / 2**30:.1f} GiB of HBM; use a larger slice, more mesh.fsdp, a smaller micro-batch "
        f"(optimizer.grad_accum_steps) or model.remat" for r in bad))
  return reports


def main(argv: Sequence[str], prog: str = "tregjax.compile") -> None:
  """Compile what --what names for --topology, print the reports (and --json_out); exit 8 when one does not fit."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    from absl import app  # pylint: disable=g-import-not-at-top
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  f = flags.FLAGS

  cli.report_errors(prog, lambda: run(f.config, f.topology, [w for w in f.what.split(",") if w], f.hbm_gib,
                                      json_out=f.json_out))


def define_flags(with_config: bool) -> None:
  """--topology, --what, --hbm_gib, --json_out (and --config for `python -m tregjax.compile`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if with_config:
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
    config_flags.DEFINE_config_file("config", None, "Trainer config file (configs/*.py[:arg]).", lock_config=False)
    flags.mark_flags_as_required(["config"])
  flags.DEFINE_string("topology", None, "TPU topology to compile for, <chip>:<AxB[xC]> (e.g. v5e:16x16, v5p:4x4x4).")
  flags.DEFINE_string("what", "train,score", "Programs to compile: train (the training step), score (the scoring "
                      "forward), comma-separated.")
  flags.DEFINE_float("hbm_gib", None, "Memory per device to hold the programs against (default: the chip's HBM).")
  flags.DEFINE_string("json_out", "", "Also write the reports as JSON to this file.")


if __name__ == "__main__":
  cli.install_command_hooks("tregjax.compile")
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags(with_config=True)
  cli.define_verbose_flag()
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.mark_flags_as_required(["topology"])
  app.run(main)
