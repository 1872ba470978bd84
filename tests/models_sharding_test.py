"""On 8 fake CPU devices, data / FSDP / tensor-parallel meshes give the single-device logits and generations.

XLA's device count is fixed at jax import, so the check runs in a subprocess with its own XLA_FLAGS.
"""

import json
import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from tregjax import models, parallel
    from tregjax.models import decoding

    assert jax.device_count() == 8, jax.devices()
    cfg = models.ModelConfig.tiny_llama(num_heads=4, num_kv_heads=2)
    model = models.from_config(cfg, 0)
    tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (8, 16)).astype(np.int32)
    segments = (np.arange(16)[None] < np.array([16, 9, 16, 3, 12, 16, 7, 16])[:, None]).astype(np.int32)

    def forward(m, t, s):
      return m(t, segment_ids=s)

    single = np.asarray(nnx.jit(forward)(model, jnp.asarray(tokens), jnp.asarray(segments)))
    prompts = [list(map(int, tokens[i, :3 + i])) for i in range(8)]
    single_gen = np.asarray(decoding.generate(model, prompts, max_new_tokens=4, key=jax.random.key(0)).tokens)
    path = tempfile.mkdtemp()
    models.save_pretrained(model, path)
    results = {}
    for name, axes in {"dp8": dict(data=8), "fsdp8": dict(data=1, fsdp=8),
                       "fsdp4_tp2": dict(data=1, fsdp=4, tensor=2)}.items():
      mesh = parallel.make_mesh(**axes)
      loaded = models.from_pretrained(path, dtype=jnp.float32, mesh=mesh)
      q = loaded.model.layers.attn.q_proj[...]
      batch = parallel.batch_sharding(mesh)
      t, s = jax.device_put(tokens, batch), jax.device_put(segments, batch)
      with parallel.use_mesh(mesh):
        out = nnx.jit(forward)(loaded, t, s)
        gen = np.asarray(decoding.generate(loaded, prompts, max_new_tokens=4, key=jax.random.key(0)).tokens)
      results[name] = dict(
          max_diff=float(np.abs(np.asarray(out) - single)[segments.astype(bool)].max()),
          q_spec=str(q.sharding.spec), q_shard_shape=list(q.addressable_shards[0].data.shape),
          out_batch_shards=len({sh.index[0].start for sh in out.addressable_shards}),
          generate_equal=bool((gen == single_gen).all()))
    print("RESULT" + json.dumps(results))
""")


def test_meshes_give_single_device_logits():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  res = json.loads(line[len("RESULT"):])
  for name in ("dp8", "fsdp8", "fsdp4_tp2"):
    assert res[name]["max_diff"] < 1e-5, res
    assert res[name]["generate_equal"], res  # KV-cache greedy decoding on the mesh, too
  # q_proj [L=2, D=64, N=4, H=16]: replicated under pure data parallelism, embed split 8 ways under FSDP,
  # embed over fsdp=4 and heads over tensor=2 in the 2-D mesh.
  assert res["dp8"]["q_shard_shape"] == [2, 64, 4, 16]
  assert res["fsdp8"]["q_shard_shape"] == [2, 8, 4, 16]
  assert res["fsdp4_tp2"]["q_shard_shape"] == [2, 16, 2, 16]
  assert res["dp8"]["out_batch_shards"] == 8 and res["fsdp8"]["out_batch_shards"] == 8
