"""Sharded equals unsharded: the same forward on 8 fake CPU devices (2x2x2 mesh) and on one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_jax.errors import ConfigError
from cloud_jax.sharding import MeshConfig
from cloud_jax.sharding import SAMPLE_RULES, TRAIN_RULES, make_mesh

SCRIPT = Path(__file__).parent / "scripts" / "sharded_forward.py"


def test_forward_on_2x2x2_mesh_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_devices_used"] == 8
    assert "fsdp" in result["q_spec"] and "tensor" in result["q_spec"]
    assert result["logits_diff"] <= 1e-5
    assert result["rewards_diff"] <= 1e-5
    # Initialising straight into shardings gives the same values as on one device.
    assert result["init_diff"] == 0.0


def test_rules_tables_cover_the_same_names():
    assert [n for n, _ in TRAIN_RULES] == [n for n, _ in SAMPLE_RULES]
    assert dict(SAMPLE_RULES)["embed"] is None


@pytest.mark.parametrize("mesh_cfg,needle", [
    (MeshConfig(data=-1, fsdp=-1), "at most one axis"),
    (MeshConfig(data=2, fsdp=1, tensor=1), "devices are present"),
    (MeshConfig(data=0, tensor=-1), "mesh.data=0: an axis size is >= 1"),
    (MeshConfig(data=-2, fsdp=-4), "mesh.data=-2: an axis size is >= 1"),
])
def test_bad_mesh_is_a_clear_error(mesh_cfg, needle):
    with pytest.raises(ConfigError, match=needle):
        make_mesh(mesh_cfg)


_PROCESS_SPLIT = """
import json
from cloud_jax.errors import ConfigError
from cloud_jax.sharding import MeshConfig, check_batch_split_over_processes, make_mesh

out = {}
for sizes in ((1, 1, 8), (1, 2, 4), (2, 1, 4), (1, 4, 2), (8, 1, 1), (2, 2, 2)):
    mesh = make_mesh(MeshConfig(*sizes))
    try:  # as on two hosts of four devices each
        check_batch_split_over_processes(mesh, process_of=lambda d: d.id // 4)
        out[str(sizes)] = "ok"
    except ConfigError as err:
        out[str(sizes)] = str(err)
print(json.dumps(out))
"""


def test_a_mesh_whose_batch_axis_leaves_hosts_sharing_rows_is_refused():
    # Two hosts of 4 devices with the mesh all on tensor: both hosts would hold the whole batch,
    # each filled with its own rows, mixing them silently (half the pairs, other losses).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _PROCESS_SPLIT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "does not give each of the 2 processes its own rows" in result["(1, 1, 8)"]
    assert "mesh.tensor within one host" in result["(1, 1, 8)"]
    assert {k: v for k, v in result.items() if k != "(1, 1, 8)"} == dict.fromkeys(
        ["(1, 2, 4)", "(2, 1, 4)", "(1, 4, 2)", "(8, 1, 1)", "(2, 2, 2)"], "ok")


@pytest.mark.parametrize("flag,needle", [
    ("data={n}", "set --mesh data=-1 to use them all"),
    ("data=-1,fsdp=-1", "--mesh: at most one axis may be -1"),
])
def test_a_bad_mesh_flag_names_the_flag_not_the_config_keys(flag, needle):
    # A command's --mesh has no mesh.data key to set: the error says what to pass instead.
    import argparse

    import jax

    from cloud_jax.cli.common import add_model_args, load_model

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    flag = flag.format(n=len(jax.local_devices()) + 1)  # one more device than there are
    args = parser.parse_args(["--checkpoint", "unused", "--mesh", flag])
    with pytest.raises(ConfigError) as err:
        load_model(args)
    assert needle in str(err.value)
    assert "mesh." not in str(err.value) and "--mesh: mesh:" not in str(err.value)
