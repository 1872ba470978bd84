"""Forward throughput of a random Llama: tregjax vs transformers (torch), same weights, same tokens, one run.

    python bench/model_forward.py [--layers 4] [--width 512] [--vocab 32000] [--batch 4] [--seq 512]
                                  [--dtype f32|bf16] [--repeats 3] [--skip-torch] [--peak-tflops X]

Both compute the full forward including [B, T, V] logits. With equal work parity is the expectation; the table
therefore also gives each framework's FLOP/s as a fraction of its own dense matmul FLOP/s measured in the same run.
On an accelerator the torch CPU column is skipped and MFU (= model FLOP/s / peak) is reported for the named device.
"""

from __future__ import annotations

import argparse
import time

import model_common
from smollm2_common import machine, table, timed_interleaved, today, update_results, write_json

# Dense bf16 peak TFLOP/s (no sparsity) by device kind, for MFU.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
                "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=32000)
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
  from tregjax import models  # pylint: disable=g-import-not-at-top

  backend = jax.default_backend()
  device = jax.devices()[0].device_kind if backend != "cpu" else machine()
  run_torch = backend == "cpu" and not args.skip_torch
  jdtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
  hf_config = model_common.llama_hf_config(args.layers, args.width, args.vocab)
  torch_model = None
  if run_torch:
    torch_model, path = model_common.save_random_hf_llama(hf_config)
    model = models.from_pretrained(path, dtype=jdtype)
  else:
    model = models.from_config(models.ModelConfig.from_hf_config(hf_config), 0, dtype=jdtype)
  cfg = model.config
  tokens_np = np.random.default_rng(0).integers(3, args.vocab, (args.batch, args.seq)).astype(np.int32)
  n_tokens = tokens_np.size
  flops = model_common.flops_per_token(cfg, args.seq) * n_tokens
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  tokens = jnp.asarray(tokens_np)
  t0 = time.perf_counter()
  compiled = forward.lower(state, tokens).compile()
  compile_s = time.perf_counter() - t0
  last_tj = np.asarray(compiled(state, tokens)[:, -1], np.float32)  # also the warm-up

  n = args.matmul
  a = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), jdtype)
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, a))
  # Every variant (model and reference matmul, each framework, each torch thread count) is timed round-robin so
  # that all see the same load on this shared machine.
  runners = {"tregjax": lambda: jax.block_until_ready(compiled(state, tokens)),
             "tregjax/matmul": lambda: jax.block_until_ready(mm(a, a))}
  thread_counts = []
  if run_torch:
    import torch  # pylint: disable=g-import-not-at-top
    tdtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch_model = torch_model.to(tdtype)
    ids = torch.from_numpy(tokens_np.astype(np.int64))
    ta = torch.from_numpy(np.asarray(a, np.float32)).to(tdtype)
    default_threads = torch.get_num_threads()
    thread_counts = [int(t) or default_threads for t in args.torch_threads.split(",")]

    def torch_call(fn, threads):
      def run():
        torch.set_num_threads(threads)
        with torch.inference_mode():
          return fn()
      return run

    for threads in thread_counts:
      runners[f"torch_{threads}"] = torch_call(lambda: torch_model(ids).logits, threads)
      runners[f"torch_{threads}/matmul"] = torch_call(lambda: ta @ ta, threads)
    with torch.inference_mode():
      last_th = torch_model(ids).logits[:, -1].float().numpy()  # warm-up
      ta @ ta
  times = timed_interleaved(runners, args.repeats)
  results = {"date": today(), "device": device, "backend": backend, "args": vars(args), "model_flops": flops}
  for name in ["tregjax"] + [f"torch_{t}" for t in thread_counts]:
    sec, all_s = times[name]
    r = results[name] = {"median_s": sec, "all_s": all_s, "tokens_per_s": n_tokens / sec, "flops_per_s": flops / sec,
                         "matmul_flops_per_s": 2 * n**3 / times[name + "/matmul"][0]}
    r["matmul_fraction"] = r["flops_per_s"] / r["matmul_flops_per_s"]
    if name != "tregjax":
      r["threads"] = int(name.split("_")[1])
  results["tregjax"]["compile_s"] = compile_s
  tj_s = results["tregjax"]["median_s"]
  peak = args.peak_tflops or next((v for k, v in _PEAK_TFLOPS.items() if k in device), 0.0)
  if backend != "cpu" and peak:
    results["tregjax"]["mfu"] = flops / tj_s / (peak * 1e12)
  if run_torch:
    results["max_abs_last_logits_diff"] = float(np.abs(last_tj - last_th).max())

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
  text = table(header, rows)
  desc = (f"random Llama {args.layers} layers, width {args.width}, vocab {args.vocab}, batch {args.batch} x "
          f"{args.seq}, {args.dtype}")
  print(f"{desc}; {device}; tregjax compile {compile_s:.1f} s; {flops / 1e9:.0f} GFLOP per forward")
  print(text)
  extra = ""
  if "mfu" in results["tregjax"]:
    extra += f" MFU {results['tregjax']['mfu']:.1%} of {peak:.0f} TFLOP/s."
    print(f"MFU {results['tregjax']['mfu']:.1%} (peak {peak} TFLOP/s)")
  if "max_abs_last_logits_diff" in results:
    extra += f" Max |last-position logits tregjax - torch| = {results['max_abs_last_logits_diff']:.1e}."
    print(f"max |last logits diff| = {results['max_abs_last_logits_diff']:.2e}")
  key = f"model_forward_{args.dtype}_{backend}"
  print(f"wrote {write_json(key, results)}")
  cmd = (f"python bench/model_forward.py --layers {args.layers} --width {args.width} --vocab {args.vocab} "
         f"--batch {args.batch} --seq {args.seq} --dtype {args.dtype}"
         + (f" --torch-threads {args.torch_threads}" if run_torch else " --skip-torch"))
  update_results(key, (
      f"### Model forward ({desc}, {backend})\n\n`{cmd}` ({today()}, {device}; median of {args.repeats}; tregjax "
      f"compile {compile_s:.1f} s; {flops / 1e9:.0f} GFLOP per forward; same weights and tokens; all rows "
      f"timed round-robin).{extra} Equal work, "
      f"so parity is the expectation; 'fraction of matmul' = model FLOP/s over the same framework's dense "
      f"{n}^3 matmul FLOP/s in the same run.\n\n{text}\n"))


if __name__ == "__main__":
  main()
