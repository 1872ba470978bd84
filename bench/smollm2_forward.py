"""SmolLM2-135M forward throughput: tregjax (from the GGUF) vs transformers torch, same inputs, one run.

    python bench/smollm2_forward.py [--batch 8] [--seq 256] [--dtype f32|bf16] [--repeats 3] [--skip-torch]

Both sides compute the full forward including the [B, T, V] logits. Equal work, so expect parity, not a
multiple: the interesting number is the fraction of a dense matmul's FLOP/s (measured in the same run, in
each framework) that the model reaches. Variants are timed round-robin; torch is timed at its default thread
count and at 1 thread (its OpenMP pool collapses on an oversubscribed CPU). On an accelerator (jax's default backend is not CPU) the torch CPU
column is skipped and only tregjax is timed, with the device named.
"""

from __future__ import annotations

import argparse
import time

from smollm2_common import (chat_prompt_ids, gguf_path, machine, table, timed_interleaved, today, update_results,
                            write_json)


def model_flops_per_token(cfg, seq: int) -> float:
  """Matmul FLOPs of one token's forward (2 per multiply-add), attention scores/values at length `seq`."""
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  per_layer = 2 * (d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2 + 3 * d * f)
  attention = 2 * 2 * seq * cfg.num_heads * hd  # QK^T and PV, dense (no causal skipping)
  return cfg.num_layers * (per_layer + attention) + 2 * d * cfg.vocab_size


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--matmul", type=int, default=2048, help="size n of the n x n x n reference matmul")
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--torch-threads", default="",
                      help="comma-separated torch thread counts to time (default: torch's default and 1)")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top

  path = gguf_path()
  jdtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind if backend != "cpu" else machine()
  run_torch = backend == "cpu" and not args.skip_torch

  # Same real inputs for both: chat prompts, each repeated/cut to exactly `seq` tokens.
  rows = []
  for ids in chat_prompt_ids(args.batch):
    rows.append((ids * (args.seq // len(ids) + 1))[: args.seq])
  tokens_np = np.asarray(rows, np.int32)
  n_tokens = tokens_np.size

  model = models.from_pretrained(str(path), dtype=jdtype, param_dtype=jnp.float32)
  cfg = model.config
  flops = model_flops_per_token(cfg, args.seq) * n_tokens
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  tokens = jnp.asarray(tokens_np)
  t0 = time.perf_counter()
  forward.lower(state, tokens).compile()
  compile_s = time.perf_counter() - t0
  n = args.matmul
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jdtype)
  mm = jax.jit(lambda x, y: x @ y)
  fns = {"tregjax": lambda: jax.block_until_ready(forward(state, tokens)),
         "tregjax_matmul": lambda: jax.block_until_ready(mm(a, a))}
  if run_torch:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    tdtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=tdtype).eval()
    ids = torch.from_numpy(tokens_np.astype(np.int64))
    ta = torch.from_numpy(np.array(a, np.float32)).to(tdtype)

    threads = torch.get_num_threads()

    def torch_fn(fn, k):  # torch's OpenMP pool degrades badly on an oversubscribed CPU, so 1 thread is timed too
      def run():
        torch.set_num_threads(k)
        with torch.inference_mode():
          return fn()
      return run

    counts = [int(k) for k in args.torch_threads.split(",")] if args.torch_threads else sorted({threads, 1})[::-1]
    for k in counts:
      fns |= {f"torch-{k}thread": torch_fn(lambda: ref(ids).logits, k),
              f"torch-{k}thread_matmul": torch_fn(lambda: ta @ ta, k)}
    torch_forward = fns[f"torch-{counts[0]}thread"]
  for fn in fns.values():  # warm-up
    fn()
  timings = timed_interleaved(fns, args.repeats)
  logits_tj = np.asarray(forward(state, tokens)[:, -1], np.float32)

  results = {"date": today(), "device": device, "backend": backend, "dtype": args.dtype, "batch": args.batch,
             "seq": args.seq, "model_flops": flops, "compile_s": compile_s}
  names = [k for k in fns if not k.endswith("_matmul")]
  for name in names:
    (med, all_s), (mm_s, _) = timings[name], timings[f"{name}_matmul"]
    results[name] = {"median_s": med, "all_s": all_s, "tokens_per_s": n_tokens / med, "flops_per_s": flops / med,
                     "matmul_flops_per_s": 2 * n**3 / mm_s, "matmul_fraction": flops / med / (2 * n**3 / mm_s)}
  if run_torch:
    results["max_abs_last_logits_diff"] = float(np.abs(logits_tj - torch_forward()[:, -1].float().numpy()).max())

  header = ["framework", "median s / forward", "tokens/s", "model GFLOP/s", f"matmul {n}^3 GFLOP/s",
            "fraction of matmul", "speed vs best torch"]
  best_torch = min((results[k]["median_s"] for k in names if k.startswith("torch")), default=float("nan"))
  rows_out = []
  for name in names:
    r = results[name]
    rows_out.append([name, f"{r['median_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['flops_per_s'] / 1e9:.1f}",
                     f"{r['matmul_flops_per_s'] / 1e9:.1f}", f"{r['matmul_fraction']:.2f}",
                     f"{best_torch / r['median_s']:.2f}x" if best_torch == best_torch else "-"])
  text = table(header, rows_out)
  print(f"SmolLM2-135M forward, batch {args.batch} x {args.seq}, {args.dtype}, {device} "
        f"(tregjax compile {compile_s:.1f} s, {flops / 1e9:.0f} GFLOP per forward)")
  print(text)
  if "max_abs_last_logits_diff" in results:
    print(f"max |last-position logits tregjax - torch| = {results['max_abs_last_logits_diff']:.2e}")
  out = write_json(f"smollm2_forward_{args.dtype}_{backend}", results)
  print(f"wrote {out}")
  cmd = f"python bench/smollm2_forward.py --batch {args.batch} --seq {args.seq} --dtype {args.dtype}" + (
      f" --torch-threads {args.torch_threads}" if args.torch_threads else "")
  update_results(f"smollm2_forward_{args.dtype}_{backend}", (
      f"### SmolLM2-135M forward, {args.dtype}, {backend}\n\n"
      f"`{cmd}` ({today()}, {device}; tregjax compile {compile_s:.1f} s; {flops / 1e9:.0f} GFLOP per forward, "
      f"median of {args.repeats}, variants interleaved). Equal work: parity is the expectation; 'fraction of matmul' is the model's "
      f"FLOP/s over the same framework's dense {n}x{n}x{n} matmul FLOP/s measured in the same run.\n\n{text}\n"))


if __name__ == "__main__":
  main()
