"""Mesh sizes (-1 fills the remaining devices, in one place) and the replication of tensors a mesh axis does not divide:
logged once per tensor, refused under `parallel.strict_sharding()`."""

import logging

import ml_collections
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from tregjax import errors, parallel


@pytest.mark.parametrize("sizes, devices, want", [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((1, 1, -1), 4, (1, 1, 4)),
    ((2, 2, 2), 8, (2, 2, 2)),
])
def test_mesh_shape_fills_the_minus_one_axis(sizes, devices, want):
  assert parallel.mesh_shape(*sizes, devices) == want


@pytest.mark.parametrize("sizes, devices, message", [
    ((-1, -1, 1), 8, r"at most one -1"),
    ((0, 1, 1), 8, r"must be positive"),
    ((-1, 3, 1), 8, r"needs 3 devices \(times the -1 axis\), but 8 are available"),
    ((2, 2, 1), 8, r"needs 4 devices, but 8 are available"),
])
def test_mesh_shape_refuses_sizes_that_do_not_fit(sizes, devices, message):
  with pytest.raises(ValueError, match=message):
    parallel.mesh_shape(*sizes, devices)


def test_mesh_from_config_names_the_config_keys():
  config = ml_collections.ConfigDict(dict(mesh=dict(data=-1, fsdp=1, tensor=3)))
  with pytest.raises(errors.ConfigError, match=r"config\.mesh: mesh data=-1 x fsdp=1 x tensor=3 needs 3 devices"):
    parallel.mesh_from_config(config)
  with pytest.raises(errors.ConfigError, match=r"config\.mesh\.tensor=3 x config\.mesh\.fsdp=1 does not divide the 1 "
                     r"local device"):
    parallel.mesh_from_config(config, per_process=True)
  # Score and generate ignore mesh.data (sized for the trainer's global mesh): their rows take this process's rest.
  config.mesh.update(data=4, tensor=1)
  assert dict(parallel.mesh_from_config(config, per_process=True).shape) == {"data": 1, "fsdp": 1, "tensor": 1}


MESH = AbstractMesh((1, 2, 2), parallel.MESH_AXES)  # only the axis sizes matter to the spec


def test_an_indivisible_dimension_is_replicated_and_logged_once_per_tensor(caplog, monkeypatch):
  monkeypatch.setattr(parallel, "_REPLICATED_LOGGED", set())  # what earlier tests in this process logged
  spec = PartitionSpec("fsdp", "tensor")
  with caplog.at_level(logging.WARNING, logger="tregjax.parallel"):
    assert parallel.fit_spec(spec, (8, 3), MESH, "layers/attn/k_proj") == PartitionSpec("fsdp", None)
    assert parallel.fit_spec(spec, (8, 3), MESH, "layers/attn/k_proj") == PartitionSpec("fsdp", None)
    assert parallel.fit_spec(spec, (8, 4), MESH, "layers/attn/q_proj") == spec  # divisible: nothing to say
    assert parallel.fit_spec(spec, (5, 3), MESH, "layers/attn/v_proj") == PartitionSpec(None, None)
  messages = [r.getMessage() for r in caplog.records]
  assert messages == [
      "layers/attn/k_proj: dimension 1 (size 3) is not divisible by mesh axis 'tensor' (size 2); replicated over "
      "'tensor' instead",
      "layers/attn/v_proj: dimension 0 (size 5) is not divisible by mesh axis 'fsdp' (size 2); replicated over "
      "'fsdp' instead"]


def test_strict_sharding_refuses_an_indivisible_dimension():
  with parallel.strict_sharding():
    assert parallel.fit_spec(PartitionSpec("fsdp", "tensor"), (8, 4), MESH, "w") == PartitionSpec("fsdp", "tensor")
    with pytest.raises(parallel.IndivisibleShardingError, match=r"^w: dimension 1 \(size 3\) is not divisible by "
                       r"mesh axis 'tensor' \(size 2\); refused under parallel.strict_sharding\(\)"):
      parallel.fit_spec(PartitionSpec("fsdp", "tensor"), (8, 3), MESH, "w")
  assert parallel.fit_spec(PartitionSpec("tensor"), (3,), MESH, "w") == PartitionSpec(None)  # strict ended
