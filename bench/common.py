"""What every benchmark shares: models to run (random Llamas, SmolLM2), trainer steps and batches, timing, results.

- Models: `add_weights_args` / `load_models` (`--weights random|smollm2`: the same weights in tregjax and
  transformers), `llama_hf_config` / `save_random_hf_llama` (a random Llama both frameworks load), `SMOLLM2_SHAPE`,
  `gguf_path` and `chat_prompt_ids` (SmolLM2-135M-Instruct and real chat prompts).
- Data: `lognormal_lengths` (prompt and response lengths of a preference set).
- The trainer's step: `preference_batch`, `trainer_program`, `trainer_step`, `compiled_runner` (the step of
  `training.trainer.build`: same loss function, optimizer, shardings, donation and batch placement as a run).
- TRL's DPOTrainer on the same ids: `word_tokenizer`, `trl_rows`, `trl_dpo_trainer`, `step_clock`.
- Timing and results: `timed`, `timed_interleaved`, `run_python` (a fresh interpreter), `machine`, `device`,
  `write_json` (bench/out/), `update_results` (a section of bench/RESULTS.md), `table`, `today`.

FLOPs per token and the accelerators' peak FLOP/s are not here: `tregjax.training.metrics` holds both (the trainer's
MFU uses them too).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from tregjax import storage  # noqa: E402  (after the checkout is on sys.path: `python bench/x.py` from anywhere)

OUT_DIR = REPO / "bench" / "out"
RESULTS = REPO / "bench" / "RESULTS.md"

# --------------------------------------------------------------------------------------------- models

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

# SmolLM2-135M-Instruct's architecture (tregjax ModelConfig fields), for random weights of its exact shape.
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                     num_kv_heads=3, head_dim=64, tie_word_embeddings=True)


GGUF_WEIGHTS = {"smollm2": "SmolLM2-135M-Instruct", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct"}


def gguf_path(name: str = "smollm2") -> Path:
  """The cached GGUF of `tregjax.assets` asset `name` (a key of GGUF_WEIGHTS)."""
  from tregjax import assets  # pylint: disable=g-import-not-at-top
  return assets.fetch(name)


def chat_prompt_ids(n: int, name: str = "smollm2") -> list[list[int]]:
  """`n` real chat-formatted prompts (cycled), as token ids of GGUF asset `name`'s tokenizer."""
  from tregjax.models.gguf import tokenizer_from_gguf  # pylint: disable=g-import-not-at-top
  tok = tokenizer_from_gguf(gguf_path(name))
  texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                   add_generation_prompt=True) for i in range(n)]
  return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def llama_hf_config(layers: int, width: int, vocab: int, heads: int | None = None, kv_heads: int | None = None,
                    ffn: int | None = None, **extra) -> dict:
  """An HF Llama config.json dict: `width // 64` heads of 64 and an MLP of 8/3 · width (multiple of 64) by default."""
  heads = heads or max(1, width // 64)
  return dict(model_type="llama", vocab_size=vocab, hidden_size=width,
              intermediate_size=ffn or int(width * 8 / 3 // 64 * 64), num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads or heads, head_dim=width // heads,
              max_position_embeddings=4096, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2) | extra


def smollm2_hf_config() -> dict:
  """`llama_hf_config` of SmolLM2-135M's shape (tied embeddings, rope base 100000)."""
  s = SMOLLM2_SHAPE
  return llama_hf_config(s["num_layers"], s["hidden_size"], s["vocab_size"], heads=s["num_heads"],
                         kv_heads=s["num_kv_heads"], ffn=s["intermediate_size"],
                         tie_word_embeddings=s["tie_word_embeddings"], max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


def add_weights_args(parser) -> None:
  """`--weights random|smollm2` and the random Llama's shape: the model options of bench/forward.py and decode.py."""
  parser.add_argument("--weights", choices=["random", *GGUF_WEIGHTS], default="random",
                      help="random: a random Llama saved by transformers; smollm2 / qwen2.5-coder-0.5b: that "
                           "instruct model's GGUF (tregjax.assets)")
  parser.add_argument("--shape", choices=["llama", "smollm2"], default="llama",
                      help="random weights: a Llama of --layers/--width/--ffn/--vocab, or SmolLM2-135M's shape")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--ffn", type=int, default=0, help="MLP width (0: 8/3 x width)")
  parser.add_argument("--vocab", type=int, default=32000)


def weights_flags(args) -> str:
  """The `add_weights_args` flags that give `args` again (for the command a RESULTS.md section shows)."""
  if args.weights in GGUF_WEIGHTS:
    return f"--weights {args.weights}"
  if args.shape == "smollm2":
    return "--weights random --shape smollm2"
  return (f"--weights random --layers {args.layers} --width {args.width}" + (f" --ffn {args.ffn}" if args.ffn else "")
          + f" --vocab {args.vocab}")


def load_models(args, dtype: str, with_torch: bool):
  """(tregjax model, transformers model or None, vocab size, description) of `add_weights_args`' choice, both in
  `dtype` ("f32" | "bf16"; tregjax's parameters float32) and with the same weights. Random weights are a torch Llama
  saved by transformers and loaded by tregjax (without torch: tregjax's own random init of that config)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top
  jdtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
  torch_model = None
  if args.weights in GGUF_WEIGHTS:
    path = gguf_path(args.weights)
    model = models.from_pretrained(str(path), dtype=jdtype, param_dtype=jnp.float32)
    if with_torch:
      import torch  # pylint: disable=g-import-not-at-top
      import transformers  # pylint: disable=g-import-not-at-top
      torch_model = transformers.AutoModelForCausalLM.from_pretrained(
          path.parent, gguf_file=path.name, dtype={"f32": torch.float32, "bf16": torch.bfloat16}[dtype]).eval()
    return model, torch_model, model.config.vocab_size, f"{GGUF_WEIGHTS[args.weights]} (GGUF)"
  hf_config = (smollm2_hf_config() if args.shape == "smollm2"
               else llama_hf_config(args.layers, args.width, args.vocab, ffn=args.ffn or None))
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch_model, path = save_random_hf_llama(hf_config)
    torch_model = torch_model.to({"f32": torch.float32, "bf16": torch.bfloat16}[dtype])
    model = models.from_pretrained(path, dtype=jdtype, param_dtype=jnp.float32)
  else:
    model = models.from_config(models.ModelConfig.from_hf_config(hf_config), 0, dtype=jdtype)
  desc = ("random weights of SmolLM2-135M's shape" if args.shape == "smollm2" else
          f"random Llama {args.layers} layers, width {args.width}, MLP {hf_config['intermediate_size']}, "
          f"vocab {args.vocab}")
  return model, torch_model, hf_config["vocab_size"], desc


def save_random_hf_llama(hf_config: dict, seed: int = 0, path: str | None = None):
  """Build a random torch Llama, save it with transformers; returns (torch model, directory)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = dict(hf_config)
  torch.manual_seed(seed)
  config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  path = path or tempfile.mkdtemp(prefix="tregjax-bench-")
  model.save_pretrained(path)
  return model, path


def lognormal_lengths(n: int, *, prompt_median: float, response_median: float, min_prompt: int, max_prompt: int,
                      max_length: int, sigma: float = 0.8, seed: int = 0) -> np.ndarray:
  """[n, 3] prompt, chosen and rejected response lengths, UltraFeedback-like lognormals truncated the way
  build_dataset truncates (min_prompt <= prompt <= max_prompt, prompt + response <= max_length)."""
  rng = np.random.default_rng(seed)
  prompt = np.clip(np.round(rng.lognormal(np.log(prompt_median), sigma, n)), min_prompt, max_prompt).astype(np.int64)
  budget = max_length - prompt
  responses = [np.minimum(np.clip(np.round(rng.lognormal(np.log(response_median), sigma, n)), 1, None), budget)
               for _ in range(2)]
  return np.stack([prompt, *responses], axis=1).astype(np.int32)


# --------------------------------------------------------------------------------------------- the trainer's step

def preference_batch(num_pairs: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0,
                     eos_id: int = 2):
  """Pairs of prompt + response + EOS, all the same length T = prompt_len + response_len + 1 (no padding)."""
  from tregjax.data.batch import PreferenceBatch, SequenceBatch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  t = prompt_len + response_len + 1
  prompts = rng.integers(3, vocab, (num_pairs, prompt_len))

  def side():
    tokens = np.concatenate([prompts, rng.integers(3, vocab, (num_pairs, response_len)),
                             np.full((num_pairs, 1), eos_id)], 1).astype(np.int32)
    labels = np.concatenate([tokens[:, 1:], np.zeros((num_pairs, 1), np.int32)], 1)
    mask = np.zeros((num_pairs, t), np.float32)
    mask[:, prompt_len - 1:t - 1] = 1.0
    return SequenceBatch(tokens=tokens, labels=labels, loss_mask=mask, segment_ids=np.ones_like(tokens),
                         positions=np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape).copy())

  c, r = side(), side()
  f = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return PreferenceBatch(chosen=c, rejected=r, ref_chosen_logps=f(num_pairs) - 50, ref_rejected_logps=f(num_pairs) - 50,
                         ref_chosen_token_logps=f(num_pairs, t) * c.loss_mask,
                         ref_rejected_token_logps=f(num_pairs, t) * r.loss_mask,
                         chosen_token_rewards=0.1 * f(num_pairs, t) * c.loss_mask,
                         rejected_token_rewards=0.1 * f(num_pairs, t) * r.loss_mask)


def trainer_program(config, steps: int = 100, init: bool = True):
  """(`training.trainer.build`'s Program, its initial state): the state is the trainer's init (the reference's
  weights with `model.hf_path`, else a random init); None with `init=False` (nothing allocated: lower from
  `program.target`)."""
  from tregjax import parallel  # pylint: disable=g-import-not-at-top
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from tregjax.training import trainer  # pylint: disable=g-import-not-at-top

  config_lib.validate(config, check_data=False)
  mesh = parallel.mesh_from_config(config)
  program = trainer.build(config, mesh, total_steps=steps)
  if not init:
    return program, None
  with parallel.use_mesh(mesh):
    state = program.init()
  return program, state


def trainer_step(config, steps: int = 100):
  """(jitted step, initial state, place, mesh) of `training.trainer.build`: `place(numpy batch)` puts a batch on the
  mesh as the trainer does."""
  program, state = trainer_program(config, steps)
  return program.train_step, state, program.place, program.mesh


def compiled_runner(config, batch, place_each_step: bool = True):
  """(run, compiled, compile seconds): `run()` does one donated step on `batch` and blocks; it has been run once.

  Each call places the batch as the trainer's loop does; `place_each_step=False` places it once, before compiling
  (the step alone is timed)."""
  import jax  # pylint: disable=g-import-not-at-top
  step, state, place, _ = trainer_step(config)
  placed = None if place_each_step else place(batch)
  t0 = time.perf_counter()
  compiled = step.lower(state, placed if placed is not None else place(batch)).compile()
  compile_s = time.perf_counter() - t0
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], placed if placed is not None else place(batch))
    jax.block_until_ready((holder[0], metrics))

  run()  # warm-up
  return run, compiled, compile_s


def xla_flops(compiled) -> float:
  """XLA's own FLOP count of a compiled executable (its cost analysis; NaN when it has none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float((cost or {}).get("flops", float("nan")))


# --------------------------------------------------------------------------------------------- TRL on the same ids

def word_tokenizer(path: str, vocab_size: int):
  """A word-level tokenizer over 'w3'..'w{V-1}' (ids 3..): every id is one whitespace-separated word."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
  fast.save_pretrained(path)
  return fast


def trl_rows(batch, prompt_len: int) -> list[dict]:
  """`preference_batch`'s pairs as TRL prompt/chosen/rejected texts of `word_tokenizer` words (EOS left to TRL)."""
  words = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
  c, r = batch.chosen, batch.rejected
  return [{"prompt": words(c.tokens[i, :prompt_len]), "chosen": " " + words(c.tokens[i, prompt_len:-1]),
           "rejected": " " + words(r.tokens[i, prompt_len:-1])} for i in range(len(c.tokens))]


def trl_dpo_trainer(model, rows: list[dict], tok, pairs: int, max_steps: int, callbacks, **overrides):
  """TRL's DPOTrainer, plain DPO at its DPOConfig defaults but for: `pairs` per step, `max_steps`, lr 1e-6, beta 0.1,
  CPU, no logging / saving / reporting / dataloader workers, seed 0, max_length 4096 (no truncation); `overrides`
  are further DPOConfig fields (e.g. bf16=False, gradient_checkpointing=False, precompute_ref_log_probs=True)."""
  from datasets import Dataset  # pylint: disable=g-import-not-at-top
  from trl import DPOConfig, DPOTrainer  # pylint: disable=g-import-not-at-top
  args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=pairs,
                   max_steps=max_steps, learning_rate=1e-6, beta=0.1, report_to="none", save_strategy="no",
                   logging_steps=10**6, use_cpu=True, dataloader_num_workers=0, seed=0, max_length=4096, **overrides)
  return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                    callbacks=callbacks)


def usage() -> dict:
  """This process's user / system CPU seconds and minor page faults so far."""
  import resource  # pylint: disable=g-import-not-at-top
  r = resource.getrusage(resource.RUSAGE_SELF)
  return dict(user=r.ru_utime, sys=r.ru_stime, minflt=r.ru_minflt)


def step_clock():
  """(a transformers TrainerCallback, its list): the callback appends (perf_counter, `usage()`) at every step end."""
  from transformers import TrainerCallback  # pylint: disable=g-import-not-at-top
  stamps: list[tuple[float, dict]] = []

  class Clock(TrainerCallback):

    def on_step_end(self, args, state, control, **kwargs):  # pylint: disable=unused-argument
      stamps.append((time.perf_counter(), usage()))

  return Clock(), stamps


# --------------------------------------------------------------------------------------------- timing

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


def run_python(code: str, *argv: str, env: dict | None = None) -> dict:
  """Runs `code` in a fresh interpreter (cwd: the repo) and returns the JSON of its last stdout line that starts with
  "RESULT"; raises with its stderr when it fails."""
  proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False,
                        cwd=str(REPO), env=env)
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
  return json.loads(lines[-1][len("RESULT"):]) if lines else {}


# --------------------------------------------------------------------------------------------- results

def machine() -> str:
  """The CPU and its 1-minute load average (the machine is shared: a load above the core count skews timings)."""
  return (f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.processor() or platform.system()}), "
          f"load avg {os.getloadavg()[0]:.1f}")


def device() -> str:
  """The accelerator's device kind, or `machine()` on CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.devices()[0].device_kind if jax.default_backend() != "cpu" else machine()


def legacy_nucleus(probs, top_p: float):
  """bool[B, V]: the top-p set as main computed it before #30 (31 fixed bisection passes over the probabilities'
  bits), the baseline bench/decode.py and bench/sample_step.py compare `decoding.nucleus_mask` against."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)

  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(jnp.where(bits >= mid[:, None], probs, 0.0), axis=-1) >= top_p
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo = jnp.zeros(probs.shape[:1], jnp.int32)
  lo, _ = jax.lax.fori_loop(0, 31, body, (lo, jnp.max(bits, axis=-1) + 1))
  return (bits >= lo[:, None]) & (probs > 0)


def write_json(name: str, payload: dict) -> Path:
  """bench/out/<name>.json (numpy scalars as numbers, anything else JSON cannot hold as its str)."""
  OUT_DIR.mkdir(parents=True, exist_ok=True)
  path = OUT_DIR / f"{name}.json"
  storage.write_text(path, json.dumps(payload, indent=2,
                                      default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
  return path


def update_results(section: str, markdown: str, path: str | Path = RESULTS) -> None:
  """Replaces this benchmark's block in bench/RESULTS.md (between markers), or appends it."""
  path = Path(path)
  begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
  block = f"{begin}\n{markdown.rstrip()}\n{end}\n"
  text = path.read_text() if path.exists() else "# Benchmark results\n\n"
  pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
  text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
  storage.write_text(path, text)


def today() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def table(headers: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)
