"""Training step on XLA:CPU with the layers under `lax.scan` vs an unrolled loop (`config.model.scan_layers`).

    python bench/train_layer_loop.py [--repeats 10] [--layers 2,4,16]

Same trainer step (DPO-REG, AdamW, chunked log-probs, float32), same batch; per depth both variants are compiled
(compile time reported) and timed round-robin (median). On XLA:CPU each scan iteration copies its slice of the
stacked weights and the scan zero-fills stacked residual buffers for the backward pass; the unrolled loop has
neither, but its program grows with depth (see also bench/model_compile.py).
"""

from __future__ import annotations

import argparse

import smollm2_common as sc
import train_bench_util as tb
import train_reg_overhead


def config_for(layers: int, scan: bool, a):
  """train_reg_overhead's model and DPO-REG step at this depth, with the chosen layer loop."""
  c = train_reg_overhead.config_for("dpo", "treg", argparse.Namespace(**{**vars(a), "layers": layers}))
  c.model.scan_layers = scan
  return c


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--layers", default="2,4,16")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--vocab", type=int, default=2048)
  a = ap.parse_args()
  prompt = a.seq // 4
  batch = tb.preference_batch(a.batch, prompt, a.seq - prompt - 1, a.vocab)
  rows, payload = [], {}
  for layers in map(int, a.layers.split(",")):
    runners, compile_s = {}, {}
    for scan in (True, False):
      name = "scan" if scan else "unrolled"
      runners[name], _, compile_s[name] = tb.compiled_runner(config_for(layers, scan, a), batch)
    times = sc.timed_interleaved(runners, a.repeats)
    ratio = times["unrolled"][0] / times["scan"][0]
    rows.append([layers, f"{times['scan'][0] * 1e3:.1f}", f"{times['unrolled'][0] * 1e3:.1f}", f"{ratio:.3f}",
                 f"{compile_s['scan']:.1f}", f"{compile_s['unrolled']:.1f}"])
    payload[layers] = dict(times={k: v[1] for k, v in times.items()}, compile_s=compile_s)
    print(rows[-1], flush=True)
  md = (f"### Training step on CPU: layers under lax.scan vs unrolled (`model.scan_layers`)\n\n"
        f"`python bench/train_layer_loop.py --repeats {a.repeats} --layers {a.layers} --batch {a.batch} --seq "
        f"{a.seq} --width {a.width} --vocab {a.vocab}` ({sc.today()}, {sc.machine()}). The trainer's jitted DPO-REG "
        f"step (AdamW, chunked log-probs, float32), {a.batch} pairs × T={a.seq}, width {a.width}; both variants "
        f"timed round-robin, median of {a.repeats}; compile = XLA compile of the step.\n\n"
        + sc.table(["layers", "scan ms / step", "unrolled ms / step", "unrolled / scan", "scan compile s",
                    "unrolled compile s"], rows))
  print(md)
  sc.write_json("train_layer_loop", dict(results=payload, args=vars(a), machine=sc.machine(), date=sc.today()))
  sc.update_results("train_layer_loop", md)


if __name__ == "__main__":
  main()
