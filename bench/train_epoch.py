"""Training throughput on SmolLM2-135M's real weights: the DPO-REG step and a whole epoch, tregjax vs TRL 1.16.

    python -m tregjax.train --config configs/smollm2_arith.py --workdir runs/smollm2_arith   # once: its sampling
        # stage writes samples/pairs.jsonl (53 on-policy pairs) and reference/hf (the GGUF as float32 safetensors)
    python bench/train_epoch.py --workdir runs/smollm2_arith [--parts step,epoch]

Both frameworks load the same Hugging Face directory (`reference/hf`, exported once from the GGUF by tregjax) in
float32. Every variant runs in its own process (peak RSS is the process's; the host allocator setting is per process).

step: 4 pairs, both sides 168 tokens (prompt 40 + response 127 + EOS, random ids; TRL gets the very same ids through a
  word-level tokenizer), AdamW, median of the timed steps after warm-up. tregjax: the trainer's jitted DPO-REG step
  (cached reference log-probs and token rewards), under each host allocator setting (tregjax/host_memory.py), with
  user / system CPU and minor page faults per step. TRL's DPOTrainer, plain DPO: (a) its defaults (DPOConfig:
  bf16=True, gradient_checkpointing=True, the reference forward inside every step), (b) tregjax's numerics (float32,
  no gradient checkpointing), (c) (b) with precompute_ref_log_probs=True (reference log-probs once, before training,
  as tregjax's scoring pass). Settings that differ from DPOConfig's defaults in every TRL run: output_dir,
  per_device_train_batch_size=4, max_steps, learning_rate=1e-6, beta=0.1, report_to="none", save_strategy="no",
  logging_steps=10**6 (no logging work), use_cpu=True, dataloader_num_workers=0, seed=0, max_length=4096 (no
  truncation of the 168-token rows).
epoch: one epoch over the pairs at 4 pairs per step, counting what a user waits for: tokenization, the reference
  pass (tregjax: `tregjax.score`, three forwards for T-REG: plain, better and worse prompt; TRL: its reference
  forwards, inside the steps or precomputed) and the training steps, compile included. tregjax batching: the bucket
  ladder (64, 128, 256, 512) as it was, the same ladder fitted to the data (`data.fit_buckets`, the default now), and
  packing into 512-token rows. TRL pads each batch to its longest row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import common
import numpy as np

STEP_PAIRS, PROMPT, RESPONSE = 4, 40, 127
RETAIN_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
TRL_VARIANTS = {
    "default": dict(),
    "matched": dict(bf16=False, gradient_checkpointing=False),
    "matched_precompute": dict(bf16=False, gradient_checkpointing=False, precompute_ref_log_probs=True),
}
TRL_LABELS = {"default": "TRL 1.16 DPOTrainer, its defaults (bf16, gradient checkpointing, ref forward per step)",
              "matched": "TRL, float32, no gradient checkpointing (tregjax's numerics)",
              "matched_precompute": "TRL, float32, no checkpointing, precompute_ref_log_probs=True"}
BATCHING = {"ladder": dict(buckets=(64, 128, 256, 512), fit_buckets=False),
            "fitted": dict(buckets=(64, 128, 256, 512), fit_buckets=True),
            "packing": dict(buckets=(64, 128, 256, 512), packing=True)}
BATCHING_LABELS = {"ladder": "buckets 64/128/256/512 (the old default)",
                   "fitted": "buckets fitted to the data (data.fit_buckets, the default)",
                   "packing": "packing into 512-token rows"}


def _emit(payload: dict) -> None:
  payload["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print("RESULT " + json.dumps(payload), flush=True)


# --------------------------------------------------------------------------------------------- the step, tregjax

def _trainer_config(hf: str, batch: int):
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.hf_path, c.model.preset, c.model.dtype = hf, "", "float32"
  c.data.batch_size = batch
  c.loss.loss, c.loss.beta, c.loss.regularizer, c.loss.alpha = "dpo", 0.1, "treg", 0.25
  c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.grad_clip = 1e-6, 0.0, 1.0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  return c


def worker_step_tregjax(a) -> None:
  config = _trainer_config(a.hf, STEP_PAIRS)
  batch = common.preference_batch(STEP_PAIRS, PROMPT, RESPONSE, 49152)
  run, compiled, compile_s = common.compiled_runner(config, batch)
  for _ in range(2):
    run()
  before = common.usage()
  step_s, times = common.timed(run, a.steps)
  after = common.usage()
  _emit(dict(step_s=step_s, times=times, compile_s=compile_s,
             step_flops=common.xla_flops(compiled),
             **{k + "_per_step": (after[k] - before[k]) / a.steps for k in after}))


def worker_split_tregjax(a) -> None:
  """Forward (loss only), forward + backward (no optimizer) and the whole step, each with XLA's FLOP count."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from tregjax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  config = _trainer_config(a.hf, STEP_PAIRS)
  program, state = common.trainer_program(config)
  placed = program.place(common.preference_batch(STEP_PAIRS, PROMPT, RESPONSE, 49152))
  loss_fn = step_lib.make_loss_fn("preference", config_lib.objective_options(config), config.train.logits_chunk_size)

  def loss(params):
    return loss_fn(nnx.merge(program.graphdef, params, state.extra), placed)[0]

  from tregjax.training import metrics  # pylint: disable=g-import-not-at-top
  t = PROMPT + RESPONSE + 1
  out = {"model_train_flops": metrics.train_flops_per_token(program.model_cfg, t) * 2 * STEP_PAIRS * t}
  for name, fn in {"forward": jax.jit(loss), "forward+backward": jax.jit(jax.grad(loss))}.items():
    compiled = fn.lower(state.params).compile()
    jax.block_until_ready(compiled(state.params))
    out[name] = dict(s=common.timed(lambda: jax.block_until_ready(compiled(state.params)), a.steps)[0],  # noqa: B023
                     flops=common.xla_flops(compiled))
  _emit(out)


# --------------------------------------------------------------------------------------------- the step, TRL

def _trl_trainer(a, rows: list[dict], tok, variant: str, max_steps: int, callbacks):
  """TRL's DPOTrainer on the float32 HF directory, `STEP_PAIRS` pairs per step, in the TRL variant's settings."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32)
  return common.trl_dpo_trainer(model, rows, tok, STEP_PAIRS, max_steps, callbacks, **TRL_VARIANTS[variant])


def worker_step_trl(a) -> None:
  batch = common.preference_batch(STEP_PAIRS, PROMPT, RESPONSE, 49152)
  # A word-level tokenizer over SmolLM2's whole vocabulary: TRL trains on our exact ids.
  tok = common.word_tokenizer(tempfile.mkdtemp(prefix="trl-tok-") + "/tok", vocab_size=49152)
  c = batch.chosen
  rows = common.trl_rows(batch, PROMPT)
  clock, stamps = common.step_clock()
  trainer = _trl_trainer(a, rows * (a.steps + 4), tok, a.variant, a.steps + 3, [clock])
  first = trainer.train_dataset[0]
  assert list(first["prompt_ids"]) + list(first["chosen_ids"]) == c.tokens[0].tolist(), "TRL tokenized other ids"
  trainer.train()
  gaps = np.diff([t for t, _ in stamps])[2:]
  u0, u1 = stamps[3][1], stamps[-1][1]
  n = len(stamps) - 4
  _emit(dict(step_s=float(np.median(gaps)), times=gaps.tolist(),
             **{k + "_per_step": (u1[k] - u0[k]) / n for k in u0}))


# --------------------------------------------------------------------------------------------- the epoch

def _epoch_config(a, batching: str, cache: str, dpo: bool = False):
  """The epoch's trainer config; `dpo`: plain DPO (no regularizer, a scoring pass of the plain forward only)."""
  c = _trainer_config(a.hf, STEP_PAIRS)
  if dpo:
    c.loss.regularizer = "none"
    c.score.token_reward.source = "none"
  c.data.train_files = [a.pairs]
  c.data.schema = "pair"
  c.data.tokenizer = a.hf
  c.data.dataset_dir = os.path.join(a.scratch, "dataset")
  c.data.cache_dir = cache
  c.data.max_prompt_length, c.data.max_length = 256, 512
  c.data.update(BATCHING.get(batching, {}))
  c.objective = "preference"
  c.train.steps, c.data.epochs = -1, 1
  c.optimizer.lr = 1e-5
  c.train.log_every = 1
  c.checkpoint.every = 10**6
  c.logging.progress_bar = False
  return c


def worker_reference_tregjax(a) -> None:
  """Tokenization (the TFDS build) and the scoring pass (plain + better + worse forwards)."""
  from tregjax import data, score  # pylint: disable=g-import-not-at-top
  dpo = a.variant == "dpo"
  c = _epoch_config(a, "fitted", os.path.join(a.scratch, "cache_dpo" if dpo else "cache"), dpo=dpo)
  t0 = time.perf_counter()
  data.build_dataset(c)
  t1 = time.perf_counter()
  score.run(c)
  t2 = time.perf_counter()
  _emit(dict(tokenize_s=t1 - t0, score_s=t2 - t1))


def worker_epoch_tregjax(a) -> None:
  from tregjax.data import pipeline, tfds_builder  # pylint: disable=g-import-not-at-top
  from tregjax.training import trainer  # pylint: disable=g-import-not-at-top
  dpo = a.variant == "dpo"
  cache = os.path.join(a.scratch, "cache_dpo" if dpo else "cache")
  c = _epoch_config(a, "fitted" if dpo else a.variant, cache, dpo=dpo)
  lengths = tfds_builder.lengths(tfds_builder.resolve(cache), "train")
  plan = pipeline.BatchPlan(lengths, global_batch_size=STEP_PAIRS, buckets=c.data.buckets, seed=c.data.seed,
                            shuffle=True, packing=c.data.packing, drop_remainder=True, process_index=0,
                            process_count=1, max_segments=c.data.max_segments if c.data.packing else None,
                            fit_buckets=c.data.get("fit_buckets", False))
  batches = plan.epoch(0)
  padded = sum(2 * len(units) * t for t, units in batches)
  real = sum(int(lengths[i].sum()) for _, units in batches for u in units for i in plan.units[u])
  t0 = time.perf_counter()
  summary = trainer.run(c, os.path.join(a.scratch, f"run_{a.variant}"))
  _emit(dict(train_s=time.perf_counter() - t0, steps=int(summary.step), shapes=sorted({t for t, _ in batches}),
             padded_tokens=padded, real_tokens=real, pairs=sum(len(plan.units[u]) for _, us in batches for u in us)))


def contrastive_pass(model, tok, records: list[dict], batch: int = STEP_PAIRS) -> list[list]:
  """What a TRL user adds for T-REG, in transformers: each response's two contrastive forwards (the prompt under the
  better and the worse instruction, as a system message), r_t = sigmoid(log p(y_t|x_better) - log p(y_t|x_worse))
  - 0.5 per response token (tregjax.losses.contrastive_token_rewards), `batch` pairs per forward, right-padded."""
  import torch  # pylint: disable=g-import-not-at-top
  from tregjax import config_schema  # pylint: disable=g-import-not-at-top
  from tregjax.data.tokenize import with_instruction  # pylint: disable=g-import-not-at-top
  rewards = []
  for start in range(0, len(records), batch):
    part = records[start:start + batch]
    responses = [tok(r[side], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
                 for r in part for side in ("chosen", "rejected")]
    logps = []
    for instruction in (config_schema.BETTER_INSTRUCTION, config_schema.WORSE_INSTRUCTION):
      prompts = [tok(tok.apply_chat_template(with_instruction(r["prompt"], instruction, "system"), tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                 for r in part for _ in range(2)]
      seqs = [p + y for p, y in zip(prompts, responses)]
      width = max(map(len, seqs))
      ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
      mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
      with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
      lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
      logps.append([lp[i, len(p) - 1:len(s) - 1] for i, (p, s) in enumerate(zip(prompts, seqs))])
    rewards += [(torch.sigmoid(b - w) - 0.5).tolist() for b, w in zip(*logps)]
  return rewards


def worker_epoch_trl(a) -> None:
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  tok = AutoTokenizer.from_pretrained(a.hf, local_files_only=True)
  variant, contrastive = a.variant.split("+")[0], a.variant.endswith("+contrastive")
  rows, records = [], []
  with open(a.pairs, encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      records.append(r)
      rows.append(dict(prompt=r["prompt"], chosen=[{"role": "assistant", "content": r["chosen"]}],
                       rejected=[{"role": "assistant", "content": r["rejected"]}]))
  steps = len(rows) // STEP_PAIRS  # one epoch, the last partial batch dropped as tregjax's drop_remainder does
  clock, stamps = common.step_clock()
  a.variant = variant
  from trl import DPOTrainer  # pylint: disable=g-import-not-at-top
  precompute = _timed_method(DPOTrainer, "_precompute_ref_logps")  # precompute_ref_log_probs's pass, in __init__
  t0 = time.perf_counter()
  trainer = _trl_trainer(a, rows, tok, variant, steps, [clock])
  t1 = time.perf_counter()
  contrastive_s = 0.0
  if contrastive:  # the reference is the model before training: score with it first, in the same process
    rewards = contrastive_pass(trainer.model, tok, records[:steps * STEP_PAIRS])
    contrastive_s = time.perf_counter() - t1
    assert len(rewards) == 2 * steps * STEP_PAIRS and all(len(x) > 0 for x in rewards)
    t1 = time.perf_counter()
  trainer.train()
  t2 = time.perf_counter()
  ds = trainer.train_dataset
  real = sum(len(x["prompt_ids"]) * 2 + len(x["chosen_ids"]) + len(x["rejected_ids"]) for x in ds)
  check = check_contrastive(rewards, os.path.join(a.scratch, "cache")) if contrastive else None
  _emit(dict(tokenize_s=t1 - t0 - contrastive_s - precompute[0], precompute_s=precompute[0],
             contrastive_s=contrastive_s, train_s=t2 - t1, steps=len(stamps), real_tokens=real, contrastive_check=check,
             first_step_s=stamps[0][0] - t1 if stamps else float("nan")))


def _timed_method(cls, name: str) -> list[float]:
  """Wraps `cls.name` to add its wall seconds to the returned one-element list."""
  total, method = [0.0], getattr(cls, name)

  def wrapper(self, *args, **kwargs):
    t = time.perf_counter()
    try:
      return method(self, *args, **kwargs)
    finally:
      total[0] += time.perf_counter() - t

  setattr(cls, name, wrapper)
  return total


def check_contrastive(rewards: list[list], cache: str) -> dict | None:
  """The contrastive pass's token rewards against those tregjax's scoring pass wrote to its T-REG cache (same pairs,
  same model, the same two instructions): max |difference| over every response both scored, after the timing.
  None when this run wrote no T-REG cache (the peer part writes it first)."""
  import re  # pylint: disable=g-import-not-at-top
  from tregjax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  if not os.path.exists(cache):
    return None
  source = tfds_builder.data_source(cache, "train")
  diffs, lengths_differ, compared = [], 0, 0
  for i in range(len(source)):
    x = source[i]
    eid = x["example_id"].decode() if isinstance(x["example_id"], bytes) else str(x["example_id"])
    line = int(re.search(r"(\d+)\s*$", eid).group(1)) - 1  # "file:line N", 1-based
    if 2 * line + 1 >= len(rewards):
      continue
    for side, ours in (("chosen", rewards[2 * line]), ("rejected", rewards[2 * line + 1])):
      cached = np.asarray(x[f"{side}_token_rewards"], np.float32)
      if len(cached) != len(ours):
        lengths_differ += 1
        continue
      compared += 1
      diffs.append(float(np.max(np.abs(cached - np.asarray(ours, np.float32)))))
  return dict(responses=compared, lengths_differ=lengths_differ, max_abs_diff=max(diffs, default=float("nan")),
              median_max_abs_diff=float(np.median(diffs)) if diffs else float("nan"))


WORKERS = {"step_tregjax": worker_step_tregjax, "split_tregjax": worker_split_tregjax, "step_trl": worker_step_trl,
           "reference_tregjax": worker_reference_tregjax, "epoch_tregjax": worker_epoch_tregjax,
           "epoch_trl": worker_epoch_trl}


# --------------------------------------------------------------------------------------------- driver

def _host_env(mode: str) -> dict:
  from tregjax import host_memory  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.ENV)}
  if mode == "hugepages":
    env = host_memory.with_hugetlb(env) or env  # what `python -m tregjax.X` re-executes itself with
  elif mode == "retain":
    env["GLIBC_TUNABLES"] = RETAIN_TUNABLES
  return env


def spawn(a, worker: str, variant: str = "", host: str = "hugepages") -> dict:
  cmd = [sys.executable, __file__, "--worker", worker, "--variant", variant, "--hf", a.hf, "--pairs", a.pairs,
         "--scratch", a.scratch, "--steps", str(a.steps)]
  t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
  out = subprocess.run(cmd, env=_host_env(host), capture_output=True, text=True, check=False)
  c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
  if out.returncode or not line:
    raise SystemExit(f"{worker} {variant} failed ({out.returncode}):\n{out.stderr[-4000:]}")
  result = json.loads(line[-1][len("RESULT "):])
  result["process_s"] = time.perf_counter() - t0
  result["process_cpu_s"] = c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime
  print(f"  {worker} {variant} {host}: {json.dumps({k: v for k, v in result.items() if k != 'times'})}",
        flush=True)
  return result


def step_part(a) -> str:
  hosts = {h: spawn(a, "step_tregjax", host=h) for h in ("system", "hugepages", "retain")}
  trl = {v: spawn(a, "step_trl", v) for v in TRL_VARIANTS}
  split = spawn(a, "split_tregjax")
  payload = dict(hosts=hosts, trl=trl, split=split, steps=a.steps, machine=common.machine(), date=common.today())
  common.write_json("train_epoch_step", payload)
  return render_step(payload)


def render_step(p: dict) -> str:
  tokens = 2 * STEP_PAIRS * (PROMPT + RESPONSE + 1)
  hosts, trl, split = p["hosts"], p["trl"], p["split"]
  rows = []
  for h, label in (("hugepages", "tregjax DPO-REG (default: TREGJAX_HOST_MALLOC=hugepages)"),
                   ("system", "tregjax DPO-REG, TREGJAX_HOST_MALLOC=system (glibc's defaults: before)"),
                   ("retain", "tregjax DPO-REG, GLIBC_TUNABLES keeping freed memory (not a mode)")):
    r = hosts[h]
    rows.append([label, f"{r['step_s']:.2f}", f"{tokens / r['step_s']:,.0f}", f"{r['peak_rss_gib']:.2f}",
                 f"{r['user_per_step']:.2f} / {r['sys_per_step']:.2f}", f"{r['minflt_per_step']:,.0f}",
                 f"{trl['default']['step_s'] / r['step_s']:.2f}x"])
  for v, r in trl.items():
    rows.append([TRL_LABELS[v], f"{r['step_s']:.2f}", f"{tokens / r['step_s']:,.0f}", f"{r['peak_rss_gib']:.2f}",
                 f"{r['user_per_step']:.2f} / {r['sys_per_step']:.2f}", f"{r['minflt_per_step']:,.0f}",
                 f"{trl['default']['step_s'] / r['step_s']:.2f}x"])
  fwd, fb = split["forward"], split["forward+backward"]
  whole = hosts["hugepages"]
  train_flops = split.get("model_train_flops")
  rate = (lambda flops, s: f"{flops / s / 1e9:.0f} GFLOP/s") if train_flops else (lambda flops, s: "n/a")
  return (f"### The DPO-REG step on SmolLM2-135M's real weights: tregjax vs TRL, and the host allocator\n\n"
          f"`python bench/train_epoch.py --workdir W --parts step --steps {p.get('steps', 5)}` ({p['date']}, "
          f"{p['machine']}). {STEP_PAIRS} pairs × {PROMPT + RESPONSE + 1} tokens per side ({tokens} tokens/step), "
          f"float32 weights from the same HF directory, median of {p.get('steps', 5)} steps after warm-up; each row its own "
          f"process (peak RSS is its own). TRL trains plain DPO (it has no T-REG); tregjax's DPO-REG costs what its "
          f"DPO does (`train_reg_overhead`).\n\n"
          + common.table(["trainer", "s / step", "tokens/s", "peak RSS GiB", "user / sys CPU s per step",
                      "minor faults / step", "speed vs TRL defaults"], rows)
          + f"\n\nWhere tregjax's step goes (same run, default allocator; model FLOPs = 6·N + attention, PaLM's "
          f"count, {(train_flops or 0) / 1e12:.2f} TFLOP per step): the loss forward {fwd['s']:.2f} s "
          f"({rate((train_flops or 0) / 3, fwd['s'])}), forward + backward {fb['s']:.2f} s "
          f"({rate(train_flops or 0, fb['s'])}, {fb['s'] / fwd['s']:.1f}× the forward), the whole step with AdamW "
          f"{whole['step_s']:.2f} s ({rate(train_flops or 0, whole['step_s'])}). XLA:CPU's own cost analysis counts "
          f"the scanned layer loop's body once ({whole['step_flops'] / 1e9:.0f} GFLOP for the step), so it cannot "
          f"serve as the FLOP count of a scan_layers model.")


def epoch_part(a) -> str:
  ref = spawn(a, "reference_tregjax")
  ours = {b: spawn(a, "epoch_tregjax", b) for b in BATCHING}
  trl = {v: spawn(a, "epoch_trl", v) for v in ("default", "matched_precompute")}
  payload = dict(reference=ref, ours=ours, trl=trl, pairs_file=sum(1 for _ in open(a.pairs, encoding="utf-8")),
                 machine=common.machine(), date=common.today())
  common.write_json("train_epoch_epoch", payload)
  return render_epoch(payload)


def render_epoch(p: dict) -> str:
  ref, ours, trl = p["reference"], p["ours"], p["trl"]
  base = trl["default"]["tokenize_s"] + trl["default"]["train_s"]
  rows = []
  for b, r in ours.items():
    total = ref["tokenize_s"] + ref["score_s"] + r["train_s"]
    rows.append([f"tregjax DPO-REG, {BATCHING_LABELS[b]}", f"{ref['tokenize_s']:.0f}", f"{ref['score_s']:.0f}",
                 f"{r['train_s']:.0f}", f"{total:.0f}", f"{1 - r['real_tokens'] / r['padded_tokens']:.1%}",
                 " ".join(map(str, r["shapes"])), f"{r['real_tokens'] / total:,.0f}", f"{base / total:.2f}x"])
  for v, r in trl.items():
    total = r["tokenize_s"] + r["train_s"]
    ref_note = "in the steps" if v == "default" else "in tokenize (precomputed)"
    rows.append([TRL_LABELS[v], f"{r['tokenize_s']:.0f}", ref_note, f"{r['train_s']:.0f}", f"{total:.0f}",
                 "to the batch's longest", "per batch", f"{r['real_tokens'] / total:,.0f}", f"{base / total:.2f}x"])
  pairs = ours["fitted"]["pairs"]
  return (f"### A whole epoch on SmolLM2's own pairs: tregjax vs TRL\n\n"
          f"`python bench/train_epoch.py --workdir W --parts epoch` ({p['date']}, {p['machine']}). The real-model "
          f"experiment's {p.get('pairs_file', 53)} on-policy pairs (`samples/pairs.jsonl`), one epoch at {STEP_PAIRS} "
          f"pairs per step ({pairs} pairs trained; the last partial batch dropped on both sides), float32, "
          f"SmolLM2's chat template on both sides. Seconds of wall time per stage, compile and model loading "
          f"included (TRL's `precompute_ref_log_probs` runs in its constructor, so it lands in the tokenize "
          f"column); tokens/s = real (unpadded) tokens of the epoch / all its seconds.\n\n"
          + common.table(["run", "tokenize s", "reference pass s", "train s", "epoch s", "padding", "jit shapes",
                      "tokens/s", "vs TRL defaults"], rows))


def peer_part(a) -> str:
  """T-REG against its real peer (TRL + the contrastive pass in transformers) and DPO against DPO."""
  runs = {"treg_reference": spawn(a, "reference_tregjax"), "treg_epoch": spawn(a, "epoch_tregjax", "fitted"),
          "dpo_reference": spawn(a, "reference_tregjax", "dpo"), "dpo_epoch": spawn(a, "epoch_tregjax", "dpo"),
          "trl": spawn(a, "epoch_trl", a.peer_trl), "trl_contrastive": spawn(a, "epoch_trl", a.peer_trl + "+contrastive")}
  payload = dict(runs=runs, pairs_file=sum(1 for _ in open(a.pairs, encoding="utf-8")), machine=common.machine(),
                 date=common.today(), load_avg=os.getloadavg()[0], trl_variant=a.peer_trl,
                 first_pairs=a.first_pairs)
  common.write_json("train_epoch_peer", payload)
  return render_peer(payload)


def render_peer(p: dict) -> str:
  r = p["runs"]
  variant = p.get("trl_variant", "default")
  ours = {k: dict(tokenize=r[f"{k}_reference"]["tokenize_s"], reference=r[f"{k}_reference"]["score_s"],
                  train=r[f"{k}_epoch"]["train_s"],
                  cpu=r[f"{k}_reference"]["process_cpu_s"] + r[f"{k}_epoch"]["process_cpu_s"],
                  wall=r[f"{k}_reference"]["process_s"] + r[f"{k}_epoch"]["process_s"], steps=r[f"{k}_epoch"]["steps"])
          for k in ("treg", "dpo")}
  theirs = {k: dict(tokenize=r[k]["tokenize_s"], reference=r[k].get("precompute_s", 0.0) + r[k].get("contrastive_s", 0.0),
                    train=r[k]["train_s"], cpu=r[k]["process_cpu_s"], wall=r[k]["process_s"], steps=r[k]["steps"])
            for k in ("trl", "trl_contrastive")}
  ref_note = {"trl": "the plain reference forward" if variant == "matched_precompute" else "none (in the steps)",
              "trl_contrastive": ("plain reference forward (precompute) + the contrastive pass"
                                  if variant == "matched_precompute" else "the contrastive pass")}
  rows = []
  for label, what, x, peer in (
      ("tregjax DPO-REG (T-REG)", "`tregjax.score`: plain + better + worse forwards", ours["treg"],
       theirs["trl_contrastive"]),
      (f"{TRL_LABELS[variant]}, + the two contrastive forwards per response in transformers",
       ref_note["trl_contrastive"], theirs["trl_contrastive"], theirs["trl_contrastive"]),
      ("tregjax DPO", "`tregjax.score`: the plain forward", ours["dpo"], theirs["trl"]),
      (TRL_LABELS[variant], ref_note["trl"], theirs["trl"], theirs["trl"])):
    epoch = x["tokenize"] + x["reference"] + x["train"]
    peer_epoch = peer["tokenize"] + peer["reference"] + peer["train"]
    rows.append([label, f"{x['tokenize']:.0f}", f"{x['reference']:.0f} ({what})",
                 f"{x['train']:.0f} ({x['steps']} steps)", f"{epoch:.0f}",
                 f"{x['wall']:.0f} / {x['cpu']:.0f}", f"{peer_epoch / epoch:.2f}x", f"{peer['cpu'] / x['cpu']:.2f}x"])
  check = r["trl_contrastive"].get("contrastive_check") or {}
  check_text = (f" Check (after the timing, same run): the contrastive pass's token rewards against the ones "
                f"`tregjax.score` wrote to its T-REG cache, {check.get('responses', 0)} responses compared "
                f"({check.get('lengths_differ', 0)} with a different token count): max |difference| "
                f"{check.get('max_abs_diff', float('nan')):.1e} (median over responses of their max "
                f"{check.get('median_max_abs_diff', float('nan')):.1e}), r_t in (-0.5, 0.5).") if check else ""
  pairs = f"tregjax {r['treg_epoch']['steps'] * STEP_PAIRS}, TRL {r['trl']['steps'] * STEP_PAIRS}"
  first = f" --first-pairs {p['first_pairs']}" if p.get("first_pairs") else ""
  trl_flag = f" --peer-trl {variant}" if variant != "matched_precompute" else ""
  return (f"### T-REG against its real peer, and DPO against DPO: one epoch on SmolLM2's own pairs (#30)\n\n"
          f"`python bench/train_epoch.py --workdir W --parts peer{first}{trl_flag}` ({p['date']}, {p['machine']}, "
          f"cpu-exclusive). The first {p['pairs_file']} on-policy "
          f"pairs of the arith experiment (`samples/pairs.jsonl`), one epoch at {STEP_PAIRS} pairs per step (pairs trained: {pairs}; "
          f"tregjax's batches are bucketed by length and each bucket drops its last partial batch, TRL drops only "
          f"the epoch's last), float32 weights from the same HF directory, each run its own process, one after "
          f"the other. TRL runs as `{variant}`: {TRL_LABELS[variant]}. A TRL user who wants T-REG must add the "
          f"contrastive pass: here the two extra forwards per response (the prompt under the better and the worse "
          f"instruction, as a system message, as tregjax renders them) in transformers, batched {STEP_PAIRS} pairs "
          f"per forward, in the TRL process, before `train()`. Seconds per stage, compile included: tokenize (TRL: "
          f"model loading too), the reference pass (tregjax: model loading and compile too), train (tregjax: model "
          f"loading and compile too); the process columns add imports. Speed = the peer's seconds / this row's "
          f"(T-REG rows against TRL + contrastive, DPO rows against TRL).{check_text}\n\n"
          + common.table(["run", "tokenize s", "reference pass s", "train s", "epoch s",
                          "process wall / CPU s", "speed vs peer (epoch s)", "speed vs peer (CPU s)"], rows))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="runs/smollm2_arith", help="a smollm2_arith run past its sampling stage")
  ap.add_argument("--parts", default="step,epoch")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per step variant")
  ap.add_argument("--first-pairs", type=int, default=0,
                  help="use only the first N pairs of pairs.jsonl (every run alike; a multiple of 4); 0: all")
  ap.add_argument("--peer-trl", default="matched_precompute", choices=sorted(TRL_VARIANTS),
                  help="the TRL settings of the peer part's two TRL runs (default: tregjax's numerics, the "
                       "reference log-probs once before training as tregjax's scoring pass)")
  ap.add_argument("--render", action="store_true", help="rewrite the RESULTS sections from bench/out/*.json")
  ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
  ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
  ap.add_argument("--hf", default="", help=argparse.SUPPRESS)
  ap.add_argument("--pairs", default="", help=argparse.SUPPRESS)
  ap.add_argument("--scratch", default="", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.worker:
    WORKERS[a.worker](a)
    return
  if a.render:
    for part, render in (("epoch", render_epoch), ("step", render_step), ("peer", render_peer)):
      if part in a.parts.split(","):
        md = render(json.loads((common.OUT_DIR / f"train_epoch_{part}.json").read_text()))
        print(md)
        common.update_results(f"train_epoch_{part}", md)
    return
  a.hf = a.hf or os.path.join(a.workdir, "reference", "hf")
  a.pairs = a.pairs or os.path.join(a.workdir, "samples", "pairs.jsonl")
  for path in (a.hf, a.pairs):
    if not os.path.exists(path):
      raise SystemExit(f"{path} is missing: run `python -m tregjax.train --config configs/smollm2_arith.py "
                       f"--workdir {a.workdir}` past its sampling stage first")
  a.scratch = tempfile.mkdtemp(prefix="train-epoch-")
  if a.first_pairs:
    with open(a.pairs, encoding="utf-8") as f:
      lines = [line for line in f if line.strip()][:a.first_pairs]
    if len(lines) < a.first_pairs:
      raise SystemExit(f"--first-pairs {a.first_pairs}: {a.pairs} holds only {len(lines)} pairs")
    a.pairs = os.path.join(a.scratch, "pairs.jsonl")
    with open(a.pairs, "w", encoding="utf-8") as f:
      f.writelines(lines)
  for part, fn in (("epoch", epoch_part), ("step", step_part), ("peer", peer_part)):
    if part in a.parts.split(","):
      md = fn(a)
      print(md)
      common.update_results(f"train_epoch_{part}", md)


if __name__ == "__main__":
  main()
