"""The package's structure, as issue #29's done-when list states it, read from the source by AST (nothing imported),
and the behaviour the module moves of #29 had to keep, against a snapshot taken before them.

tests/data/structure_snapshot.json was written on main d96f11f, before any #29 move, by building a tiny Llama with
LoRA adapters on every linear projection (`lora.add_adapters(..., targets="all_linear")`), listing its parameter
paths, shapes, logical axes and variable types, saving its PEFT adapter and listing the tensor names/shapes, and
computing the stage keys (`Stages.key_json`/`key_hash`) of every stage of configs/demo.py with the workdir "/W". Its
PEFT names and shapes were checked by hand against PEFT's layout (see the file's "note").
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import stat

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tregjax import models, parallel, storage
from tregjax.experiments import runner, stages
from tregjax.models import adapters, safetensors
from tregjax.synthetic import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = os.path.join(ROOT, "tests", "data", "structure_snapshot.json")


# ------------------------------------------------------------------ the import graph, from the source


def python_files(top: str) -> dict[str, str]:
  """Module name -> file for every .py under ROOT/top ("tregjax.models.lora"; a test file by its bare name)."""
  out = {}
  for d, _, files in os.walk(os.path.join(ROOT, top)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(d, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        if top == "tests":
          rel = rel[len("tests."):]
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


PACKAGE = python_files("tregjax")
TESTS = python_files("tests")
ALL = PACKAGE | TESTS


def resolve(name: str) -> str | None:
  """The project module an imported dotted name belongs to (longest prefix that is a module), or None."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    if ".".join(parts[:i]) in ALL:
      return ".".join(parts[:i])
  return None


class Import:
  """One import statement of a module: what it names, the project modules it reaches, where it stands."""

  def __init__(self, node: ast.Import | ast.ImportFrom, module: str, in_function: bool, line: str):
    self.node, self.in_function, self.line = node, in_function, line
    self.lineno = node.lineno
    if isinstance(node, ast.Import):
      self.base, self.names = "", [a.name for a in node.names]
      self.targets = [a.name for a in node.names]
    else:
      base = node.module or ""
      if node.level:
        pkg = module if ALL[module].endswith("__init__.py") else module.rpartition(".")[0]
        parts = pkg.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      self.base, self.names = base, [a.name for a in node.names]
      self.targets = [f"{base}.{a}" for a in self.names] + [base]
    self.modules = {m for m in map(resolve, self.targets) if m is not None and m != module}


def imports(module: str) -> list[Import]:
  """Every import of `module`, top-level or inside a function (with the source line, for its comment)."""
  path = ALL[module]
  with open(path, encoding="utf-8") as f:
    src = f.read()
  lines = src.splitlines()
  tree = ast.parse(src)
  out = []

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        text = " ".join(lines[child.lineno - 1:child.end_lineno])
        out.append(Import(child, module, in_function, text))
      visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

  visit(tree, False)
  return out


def edges(modules: dict[str, str]) -> dict[str, set[str]]:
  """module -> the project modules it imports (a package's own ancestors left out: importing a submodule runs them)."""
  out = {}
  for m in modules:
    out[m] = {t for imp in imports(m) for t in imp.modules if not m.startswith(t + ".")}
  return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def connect(v: str) -> None:
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return out


def test_cycle_finder_finds_a_hand_made_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
  assert cycles(graph) == [["a", "b", "c"]]
  assert not cycles({"a": {"b"}, "b": set()})


def test_the_package_import_graph_has_no_cycle():
  """Imports inside functions included: a cycle kept from failing at import time by a local import is still one."""
  assert not cycles(edges(PACKAGE))


def test_the_experiment_runner_imports_no_task_and_names_none():
  """Tasks are registered by "module:Class" in tregjax.programs; neither the runner nor any experiments module imports
  one, and no training module or the runner names a task's section."""
  for m in PACKAGE:
    if m.startswith("tregjax.experiments."):
      reached = {t for imp in imports(m) for t in imp.modules}
      assert not {t for t in reached if t.startswith(("tregjax.synthetic", "tregjax.tasks"))}, m
  for m, path in PACKAGE.items():
    if m.startswith("tregjax.training.") or m == "tregjax.experiments.runner":
      with open(path, encoding="utf-8") as f:
        text = f.read()
      assert "demo" not in text and "arith" not in text, m


def test_the_models_package_imports_one_way():
  """models/: config <- lora <- layers <- transformer <- hf_io <- adapters <- pretrained (state and safetensors
  below hf_io); a module never imports one to its right."""
  order = ["config", "lora", "layers", "transformer", "state", "safetensors", "hf_io", "adapters", "pretrained"]
  graph = edges({m: p for m, p in PACKAGE.items() if m.startswith("tregjax.models.")})
  for m, targets in graph.items():
    name = m.rpartition(".")[2]
    if name not in order:
      continue
    for t in targets:
      other = t.rpartition(".")[2] if t.startswith("tregjax.models.") else None
      if other in order:
        assert order.index(other) < order.index(name), f"{m} imports {t}"
  assert not cycles(graph)


def test_lora_layer_pieces_import_no_project_module_but_parallel():
  allowed = {"tregjax.parallel"}
  reached = {t for imp in imports("tregjax.models.lora") for t in imp.modules}
  assert reached <= allowed, reached


def test_the_library_modules_import_no_cli():
  """cli is the command layer (entry wrappers, exit statuses): parallel, config_schema, training/, data/ and jobs sit
  below it (a job command's entry wrapper is `cli.job_main`; the job's barriers are `jobs.barrier`)."""
  below = ("tregjax.config_schema", "tregjax.parallel", "tregjax.jobs")
  assert set(below) <= set(PACKAGE)
  for m in PACKAGE:
    if m in below or m.startswith(("tregjax.training.", "tregjax.data.")):
      reached = {t for imp in imports(m) for t in imp.modules}
      assert "tregjax.cli" not in reached, m


def test_the_trainer_imports_no_lora_module():
  """Model assembly (base, adapters fresh or from PEFT) is training/model_init.py's; the loop knows no adapters."""
  reached = {t for imp in imports("tregjax.training.trainer") for t in imp.modules}
  assert not reached & {"tregjax.models.lora", "tregjax.models.adapters"}, reached


def test_hf_io_imports_no_adapters_module():
  reached = {t for imp in imports("tregjax.models.hf_io") for t in imp.modules}
  assert not reached & {"tregjax.models.adapters", "tregjax.models.pretrained", "tregjax.models.lora"}, reached


def test_one_config_error_and_no_rebound_names():
  """One `class ConfigError` (and one StaleCacheError), in tregjax/errors.py; no module-level `X = module.X`."""
  classes, rebound = [], []
  for m, path in PACKAGE.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    modules = {a.asname or a.name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               for a in node.names}
    for node in ast.walk(tree):
      if isinstance(node, ast.ClassDef) and node.name in ("ConfigError", "StaleCacheError"):
        classes.append((node.name, m))
    for node in tree.body:
      if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute)
          and isinstance(node.value.value, ast.Name) and node.value.value.id in modules):
        for target in node.targets:
          if isinstance(target, ast.Name) and target.id == node.value.attr:
            rebound.append(f"{m}: {target.id} = {node.value.value.id}.{node.value.attr}")
  assert sorted(classes) == [("ConfigError", "tregjax.errors"), ("StaleCacheError", "tregjax.errors")]
  assert not rebound, rebound


def private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def private_names_used_across_modules(trees: dict[str, ast.Module]) -> list[str]:
  """`from x import _y`, `import x._y`, and `obj._y` where `_y` is a private name a different project file defines
  (any receiver but self/cls: a module, a class, an instance); losses._checks inside losses/ is the one exception."""
  defined: dict[str, set[str]] = {}
  for rel, tree in trees.items():
    for node in ast.walk(tree):
      names = []
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        names = [node.name]
      elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Store):
        names = [node.id if isinstance(node, ast.Name) else node.attr]
      for n in filter(private, names):
        defined.setdefault(n, set()).add(rel)
  found = []
  for rel, tree in trees.items():
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tregjax")):
        module = node.module or ""
        for a in node.names:
          if private(a.name) or any(map(private, module.split("."))):
            inside_losses = rel.startswith("tregjax/losses/")
            if inside_losses and "_checks" in (a.name, module.rpartition(".")[2]):
              continue
            found.append(f"{rel}:{node.lineno} from {'.' * node.level}{module} import {a.name}")
      elif isinstance(node, ast.Import):
        found += [f"{rel}:{node.lineno} import {a.name}" for a in node.names
                  if a.name.startswith("tregjax") and any(map(private, a.name.split(".")))]
      elif isinstance(node, ast.Attribute) and private(node.attr):
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
          continue
        if defined.get(node.attr, {rel}) - {rel} and rel not in defined[node.attr]:
          found.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
  return found


def parsed(tops: tuple[str, ...]) -> dict[str, ast.Module]:
  out = {}
  for top in tops:
    for path in python_files(top).values():
      with open(path, encoding="utf-8") as f:
        out[os.path.relpath(path, ROOT)] = ast.parse(f.read())
  return out


def test_the_private_name_finder_finds_hand_made_uses():
  trees = {"tregjax/a.py": ast.parse("def _f(): pass\nclass C:\n  def _m(self): self._m()\n"),
           "tests/b_test.py": ast.parse("from tregjax import a\nfrom tregjax.a import _f\na._f()\na.C()._m()\n"),
           "tregjax/losses/x.py": ast.parse("from tregjax.losses import _checks\n"),
           "tregjax/c.py": ast.parse("from tregjax.losses import _checks\n")}
  assert private_names_used_across_modules(trees) == [
      "tests/b_test.py:2 from tregjax.a import _f", "tests/b_test.py:3 a._f", "tests/b_test.py:4 a.C()._m",
      "tregjax/c.py:1 from tregjax.losses import _checks"]


def test_no_private_name_is_used_across_modules():
  """Acceptance 2: a name another module (test, bench) needs is public, with a docstring."""
  found = private_names_used_across_modules(parsed(("tregjax", "tests", "bench")))
  assert not found, found


MAX_FUNCTION_IMPORTS = 40  # acceptance 6 (from 80): the rest import at module level


def reason_of(imp: Import, lines: list[str]) -> str:
  """The reason a project import stands inside a function: its trailing comment less the pylint tag, or the comment
  line right above it."""
  trailing = imp.line.partition("#")[2]
  trailing = re.sub(r"pylint:\s*disable=[\w-]+", "", trailing).strip(" ()")
  above = lines[imp.lineno - 2].strip() if imp.lineno >= 2 else ""
  return trailing or (above[1:].strip() if above.startswith("#") else "")


def test_few_project_imports_inside_functions_each_with_its_reason():
  """Acceptance 6: at most 40 project imports inside functions, each saying why (a heavy optional dependency, a
  command entry point that must answer --help without jax, a module that config files import and so must stay
  light). Config files import the light modules (training.config, experiments.stages, synthetic.world,
  tasks.sections); the runner, the tasks and the trainer import what they run at their top."""
  inside, unexplained = [], []
  for m, path in PACKAGE.items():
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
    for imp in imports(m):
      if imp.in_function and imp.modules:
        inside.append(f"{m}:{imp.lineno}")
        if not reason_of(imp, lines):
          unexplained.append(f"{m}:{imp.lineno} {imp.line.strip()}")
  assert len(inside) <= MAX_FUNCTION_IMPORTS, inside
  assert not unexplained, unexplained


def test_the_reason_finder_reads_a_trailing_or_preceding_comment():
  src = ("def f():\n"
         "  from tregjax import a  # pylint: disable=g-import-not-at-top  (heavy: jax)\n"
         "  # command entry: --help without jax\n"
         "  from tregjax import b  # pylint: disable=g-import-not-at-top\n"
         "  from tregjax import c  # pylint: disable=g-import-not-at-top\n")
  lines = src.splitlines()
  found = []
  for node in ast.walk(ast.parse(src)):
    if isinstance(node, ast.ImportFrom):
      imp = Import.__new__(Import)
      imp.lineno, imp.line = node.lineno, lines[node.lineno - 1]
      found.append(reason_of(imp, lines))
  assert found == ["heavy: jax", "command entry: --help without jax", ""]


def test_every_atomic_write_goes_through_storage():
  """THE atomic write lives in tregjax/storage.py: no other module of the package or bench/ renames a file into place
  or makes its own temporary sibling."""
  found = []
  for m, path in PACKAGE.items() | python_files("bench").items():
    if m == "tregjax.storage":
      continue
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and (node.value.id, node.attr) in {("os", "replace"), ("os", "rename"), ("tempfile", "NamedTemporaryFile")}):
        found.append(f"{m}:{node.lineno} {node.value.id}.{node.attr}")
  assert not found, found


def test_an_atomic_write_is_whole_or_absent_and_0644(tmp_path):
  """A block that raises leaves neither the file nor a temporary; one that ends leaves the file 0644 (umask 022),
  and a directory written by `atomic_dir` 0755 with all its files."""
  old = os.umask(0o022)
  try:
    try:
      with storage.atomic_file(str(tmp_path / "a.bin")) as f:
        f.write(b"half")
        raise KeyboardInterrupt
    except KeyboardInterrupt:
      pass
    assert os.listdir(tmp_path) == []
    with storage.atomic_file(str(tmp_path / "a.txt"), "w") as f:
      f.write("whole")
    with storage.atomic_path(str(tmp_path / "b.bin")) as name:
      with open(name, "wb") as f:
        f.write(b"by name")
    with storage.atomic_dir(str(tmp_path / "d")) as d:
      with open(os.path.join(d, "x"), "w", encoding="utf-8") as f:
        f.write("x")
  finally:
    os.umask(old)
  assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin", "d"]
  assert (tmp_path / "a.txt").read_text() == "whole" and (tmp_path / "b.bin").read_bytes() == b"by name"
  modes = {n: oct(stat.S_IMODE(os.stat(tmp_path / n).st_mode)) for n in ("a.txt", "b.bin", "d")}
  assert modes == {"a.txt": "0o644", "b.bin": "0o644", "d": "0o755"}
  assert os.listdir(tmp_path / "d") == ["x"]


# ------------------------------------------------------------------ behaviour kept


def snapshot() -> dict:
  with open(SNAPSHOT, encoding="utf-8") as f:
    return json.load(f)


def snapshot_model():
  cfg = models.ModelConfig.tiny_llama(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
                                      num_heads=4, num_kv_heads=2, head_dim=4)
  return adapters.add_adapters(models.from_config(cfg, 0), rank=2, alpha=4.0, targets="all_linear")


def test_lora_parameter_paths_shapes_and_axes_match_the_snapshot_taken_before_the_move():
  params = {parallel.path_str(p): [list(v.get_value().shape), list(v.get_metadata().get("axes") or ()),
                                   type(v).__name__]
            for p, v in nnx.to_flat_state(nnx.state(snapshot_model()))}
  assert params == snapshot()["lora_params"]


def test_peft_tensor_names_match_the_snapshot_and_exported_files_are_0644(tmp_path):
  old = os.umask(0o022)
  try:
    model = snapshot_model()
    adapter_dir = adapters.save_adapter(model, str(tmp_path / "adapter"))
    models.save_pretrained(model, str(tmp_path / "hf"), max_shard_size=4096)  # sharded: index.json too
  finally:
    os.umask(old)
  header, _ = safetensors.read_header(os.path.join(adapter_dir, adapters.WEIGHTS_NAME))
  names = {k: [v["dtype"], v["shape"]] for k, v in header.items() if k != "__metadata__"}
  assert names == snapshot()["peft_tensors"]
  with open(os.path.join(adapter_dir, adapters.CONFIG_NAME), encoding="utf-8") as f:
    assert sorted(json.load(f)) == snapshot()["peft_config_keys"]
  written = [os.path.join(d, f) for d in (adapter_dir, str(tmp_path / "hf")) for f in os.listdir(d)]
  assert any(p.endswith("model.safetensors.index.json") for p in written), written
  assert {oct(stat.S_IMODE(os.stat(p).st_mode)) for p in written} == {"0o644"}, written
  # The merged export holds the base weights plus (α/r)·A B: with B = 0 at init, the base's q_proj exactly.
  reloaded = models.from_pretrained(str(tmp_path / "hf"), dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(reloaded.model.layers.attn.q_proj[...]),
                                np.asarray(model.model.layers.attn.q_proj[...]))


def demo_stage_keys(root: str) -> dict:
  """Every stage key of configs/demo.py's experiment, built as the runner and the synthetic task build them."""
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  task = demo.SyntheticTask(config)
  workdir = stages.Stages(root)
  prepared = stages.Prepared(reference=root + "/reference/hf", tokenizer=root + "/world/tokenizer",
                             train_pairs=root + "/world/pairs_train.jsonl", eval_pairs=root + "/world/pairs_eval.jsonl",
                             data=dict(max_prompt_length=16, max_length=32, buckets=(32,)))
  world_key = task.demo.to_dict()
  sft = {k: v for k, v in stages.stage_key(stages.trainer_config(config, task.section)).items()
         if k not in ("loss", "score")}
  keys = {"world": world_key, "reference": dict(world=world_key, trainer=sft)}
  for arm in config.experiment.arms:
    keys[f"arms/{arm}"] = stages.stage_key(runner.arm_stage(config, task, prepared, workdir, arm))
  keys["reward_model"] = stages.stage_key(runner.reward_model_stage(config, task, prepared, workdir,
                                                                    runner.experiment_section(config)))
  return workdir, keys


def test_an_existing_demo_workdir_is_reused_every_stage_key_unchanged(tmp_path):
  """A workdir whose DONE files were written before the #29 move (the snapshot's keys) is reused: `done` is True for
  every stage of configs/demo.py, never a StaleCacheError."""
  root = str(tmp_path / "W")
  workdir, keys = demo_stage_keys(root)
  stored = snapshot()["demo_stage_keys"]
  assert set(keys) == set(stored)
  for name, key in keys.items():
    os.makedirs(workdir.path(name))
    with open(os.path.join(workdir.path(name), "DONE"), "w", encoding="utf-8") as f:
      json.dump(dict(seconds=1.0, **stored[name]), f)
    assert workdir.done(name, key), name
