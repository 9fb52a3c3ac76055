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
