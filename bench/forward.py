"""Forward throughput: tregjax vs transformers (torch), same weights, same tokens, one run.

    python bench/forward.py --weights random [--layers 4] [--width 512] [--ffn F] [--vocab 32000] [--shape llama|smollm2]
    python bench/forward.py --weights smollm2
        common: [--batch 4] [--seq 512] [--dtype f32|bf16] [--repeats 3] [--skip-torch] [--torch-threads 0,1]
                [--peak-tflops X]

--weights random: a random Llama of `--layers` x `--width` with `--vocab` (or, with `--shape smollm2`, of exactly
SmolLM2-135M's shape), saved by transformers and loaded by tregjax, on random token ids. --weights smollm2:
SmolLM2-135M-Instruct from its GGUF file (both frameworks load it), on real chat prompts each repeated/cut to `--seq`
tokens. Both compute the full forward including [B, T, V] logits. With equal work parity is the expectation; the table
therefore also gives each framework's FLOP/s as a fraction of its own dense matmul FLOP/s measured in the same run.
All variants (each framework, each torch thread count, each reference matmul) are timed round-robin. On an
accelerator (jax's default backend is not CPU) the torch CPU column is skipped and MFU (= model FLOP/s / peak, the
peak from `tregjax.training.metrics.ACCELERATORS` unless --peak-tflops) is reported for the device. Model FLOPs:
`tregjax.training.metrics.forward_flops_per_token` (matmuls, attention counted dense).
"""

from __future__ import annotations

import argparse
import time

import common


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_weights_args(parser)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--matmul", type=int, default=2048, help="n of the n x n x n reference matmul")
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: by device)")
  parser.add_argument("--torch-threads", default="0,1", help="torch thread counts to time (0: torch's default)")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tregjax.training import metrics  # pylint: disable=g-import-not-at-top

  backend = jax.default_backend()
  device = common.device()
  run_torch = backend == "cpu" and not args.skip_torch
  jdtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
  model, torch_model, vocab, desc = common.load_models(args, args.dtype, run_torch)
  if args.weights == "smollm2":  # real inputs: chat prompts, each repeated/cut to exactly `seq` tokens
    tokens_np = np.asarray([(ids * (args.seq // len(ids) + 1))[:args.seq]
                            for ids in common.chat_prompt_ids(args.batch)], np.int32)
  else:
    tokens_np = np.random.default_rng(0).integers(3, vocab, (args.batch, args.seq)).astype(np.int32)
  desc += f", batch {args.batch} x {args.seq}, {args.dtype}"
  cfg = model.config
  n_tokens = tokens_np.size
  flops = metrics.forward_flops_per_token(cfg, args.seq) * n_tokens
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  tokens = jnp.asarray(tokens_np)
  t0 = time.perf_counter()
  compiled = forward.lower(state, tokens).compile()
  compile_s = time.perf_counter() - t0

  n = args.matmul
  a = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), jdtype)
  mm = jax.jit(lambda x, y: x @ y)
  runners = {"tregjax": lambda: jax.block_until_ready(compiled(state, tokens)),
             "tregjax/matmul": lambda: jax.block_until_ready(mm(a, a))}
  thread_counts = []
  if run_torch:
    import torch  # pylint: disable=g-import-not-at-top
    tdtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ids = torch.from_numpy(tokens_np.astype(np.int64))
    ta = torch.from_numpy(np.asarray(a, np.float32)).to(tdtype)
    default_threads = torch.get_num_threads()
    # torch's OpenMP pool degrades badly on an oversubscribed CPU, so 1 thread is timed too (by default).
    thread_counts = list(dict.fromkeys(int(t) or default_threads for t in args.torch_threads.split(",")))

    def torch_call(fn, threads):
      def run():
        torch.set_num_threads(threads)
        with torch.inference_mode():
          return fn()
      return run

    for threads in thread_counts:
      runners[f"torch_{threads}"] = torch_call(lambda: torch_model(ids).logits, threads)
      runners[f"torch_{threads}/matmul"] = torch_call(lambda: ta @ ta, threads)
  last = {}
  for name, run in runners.items():  # warm-up; the models' last-position logits are compared below
    out = run()
    if "/" not in name:
      last[name] = out[:, -1].float().numpy() if name.startswith("torch") else np.asarray(out[:, -1], np.float32)
    del out
  times = common.timed_interleaved(runners, args.repeats)
  results = {"date": common.today(), "device": device, "backend": backend, "args": vars(args), "model_flops": flops}
  for name in ["tregjax"] + [f"torch_{t}" for t in thread_counts]:
    sec, all_s = times[name]
    r = results[name] = {"median_s": sec, "all_s": all_s, "tokens_per_s": n_tokens / sec, "flops_per_s": flops / sec,
                         "matmul_flops_per_s": 2 * n**3 / times[name + "/matmul"][0]}
    r["matmul_fraction"] = r["flops_per_s"] / r["matmul_flops_per_s"]
    if name != "tregjax":
      r["threads"] = int(name.split("_")[1])
  results["tregjax"]["compile_s"] = compile_s
  tj_s = results["tregjax"]["median_s"]
  peak = args.peak_tflops * 1e12 or metrics.peak_flops_per_device()
  if backend != "cpu" and peak:
    results["tregjax"]["mfu"] = flops / tj_s / peak
  if run_torch:
    results["max_abs_last_logits_diff"] = float(np.abs(last["tregjax"] - last[f"torch_{thread_counts[0]}"]).max())

  header = ["framework", "median s / forward", "tokens/s", "model GFLOP/s", f"matmul {n}^3 GFLOP/s",
            "fraction of matmul", "speed vs fastest torch"]
  torch_keys = [k for k in results if k.startswith("torch_")]
  best = min((results[k]["median_s"] for k in torch_keys), default=None)
  rows = []
  for name in ["tregjax"] + torch_keys:
    r = results[name]
    ratio = f"{best / r['median_s']:.2f}x" if best else "n/a"
    label = f"torch ({r['threads']} threads)" if name != "tregjax" else name
    rows.append([label, f"{r['median_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['flops_per_s'] / 1e9:.1f}",
                 f"{r['matmul_flops_per_s'] / 1e9:.1f}", f"{r['matmul_fraction']:.2f}", ratio])
  text = common.table(header, rows)
  print(f"{desc}; {device}; tregjax compile {compile_s:.1f} s; {flops / 1e9:.0f} GFLOP per forward")
  print(text)
  extra = ""
  if "mfu" in results["tregjax"]:
    extra += f" MFU {results['tregjax']['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s."
    print(f"MFU {results['tregjax']['mfu']:.1%} (peak {peak / 1e12:.0f} TFLOP/s)")
  if "max_abs_last_logits_diff" in results:
    extra += f" Max |last-position logits tregjax - torch| = {results['max_abs_last_logits_diff']:.1e}."
    print(f"max |last-position logits tregjax - torch| = {results['max_abs_last_logits_diff']:.2e}")
  shape = "_smollm2_shape" if args.weights == "random" and args.shape == "smollm2" else ""
  key = f"forward_{args.weights}{shape}_{args.dtype}_{backend}"
  print(f"wrote {common.write_json(key, results)}")
  cmd = (f"python bench/forward.py {common.weights_flags(args)} --batch {args.batch} --seq {args.seq} "
         f"--dtype {args.dtype} --repeats {args.repeats}" + (f" --torch-threads {args.torch_threads}" if run_torch else " --skip-torch"))
  common.update_results(key, (
      f"### Forward ({desc}, {backend})\n\n`{cmd}` ({common.today()}, {device}; median of {args.repeats}; tregjax "
      f"compile {compile_s:.1f} s; {flops / 1e9:.0f} GFLOP per forward; same weights and tokens; all rows "
      f"timed round-robin).{extra} Equal work, "
      f"so parity is the expectation; 'fraction of matmul' = model FLOP/s over the same framework's dense "
      f"{n}^3 matmul FLOP/s in the same run.\n\n{text}\n"))


if __name__ == "__main__":
  main()
