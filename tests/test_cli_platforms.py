"""Commands on a host without an accelerator: JAX pinned to the CPU where no accelerator device,
TPU variable or unknown plugin says otherwise (no plugin tracebacks or TPU probe at start), and
never where one does or where JAX_PLATFORMS is set; and importing JAX with the CUDA plugin logs no
missing-driver lines."""

import os
import subprocess
import sys

import pytest

from cloud_jax.cli import common
from cloud_jax.cli.aot import cuda_plugin_installed
from cloud_jax.cli.common import accelerator_hint, default_to_cpu_without_accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_PLUGIN = "jax_plugins.xla_cuda12"


def hint(dev, environ=None, plugins=(CUDA_PLUGIN,), platform="linux"):
    return accelerator_hint(environ or {}, dev=str(dev), plugins=list(plugins), platform=platform)


def test_a_cpu_host_with_the_cuda_plugin_and_libtpu_installed_has_no_accelerator(tmp_path):
    for name in ("null", "shm", "vfio/vfio", "dri/renderD128", "nvme0"):  # vfio's control node
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    # What JAX and libtpu themselves set in-process on any host.
    environ = {"TPU_LIBRARY_PATH": "/x/libtpu.so", "TPU_SKIP_MDS_QUERY": "1", "PATH": "/bin"}
    assert hint(tmp_path, environ, plugins=[CUDA_PLUGIN, "xla_cuda12", "jax_plugins.xla_rocm7"]) \
        is None


@pytest.mark.parametrize("node", ["nvidia0", "nvidia3", "nvidiactl", "dxg", "kfd", "accel0",
                                  "vfio/0", "vfio/17"])
def test_an_accelerator_device_node_keeps_jax_discovery(tmp_path, node):
    (tmp_path / node).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / node).touch()
    assert hint(tmp_path) == str(tmp_path / node)


@pytest.mark.parametrize("name", ["TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID",
                                  "JAX_FORCE_TPU_INIT", "PJRT_NAMES_AND_LIBRARY_PATHS"])
def test_a_tpu_or_plugin_variable_keeps_jax_discovery(tmp_path, name):
    assert hint(tmp_path, {name: "x"}) == f"${name}"


def test_a_tpu_vm_name_in_a_workstation_shell_is_no_accelerator(tmp_path):
    # tpu_scripts/ name the slice to create or reach by TPU_NAME; exported in a workstation's
    # shell it says nothing about this host (neither JAX nor libtpu reads it).
    assert hint(tmp_path, {"TPU_NAME": "cloud-8b", "TPU_ENV": "/home/me/cloud-8b.env"}) is None


def test_an_unknown_plugin_or_another_os_keeps_jax_discovery(tmp_path):
    assert hint(tmp_path, plugins=[CUDA_PLUGIN, "jax_plugins.intel_xpu"]) == \
        "JAX plugin jax_plugins.intel_xpu"
    assert hint(tmp_path, platform="darwin") == "platform darwin"


class FakeConfig:
    def __init__(self, platforms=None, initialised=False):
        self.jax_platforms, self.initialised, self.updates = platforms, initialised, []

    def update(self, name, value):
        if self.initialised:
            raise RuntimeError("jax_platforms config should be updated before backends are "
                               "initialized")
        self.updates.append((name, value))


@pytest.fixture
def fake_jax(monkeypatch):
    def make(hint_=None, **kw):
        config = FakeConfig(**kw)
        monkeypatch.setattr(common, "jax", type("FakeJax", (), {"config": config}))
        monkeypatch.setattr(common, "accelerator_hint", lambda environ: hint_)
        return config
    return make


def test_no_accelerator_and_no_jax_platforms_pins_the_cpu(fake_jax):
    config = fake_jax()
    assert default_to_cpu_without_accelerator({}) is True
    assert config.updates == [("jax_platforms", "cpu")]


@pytest.mark.parametrize("case", ["JAX_PLATFORMS", "empty JAX_PLATFORMS", "config", "device",
                                  "backend made"])
def test_an_explicit_platform_an_accelerator_or_a_made_backend_is_left_alone(fake_jax, case):
    environ = {"JAX_PLATFORMS": "tpu"} if case == "JAX_PLATFORMS" else (
        {"JAX_PLATFORMS": ""} if case == "empty JAX_PLATFORMS" else {})
    config = fake_jax(hint_="/dev/nvidia0" if case == "device" else None,
                      platforms="cuda" if case == "config" else None,
                      initialised=case == "backend made")
    assert default_to_cpu_without_accelerator(environ) is False
    assert config.updates == []


needs_cuda_plugin = pytest.mark.skipif(
    not cuda_plugin_installed(),
    reason="JAX's CUDA plugin not installed: pip install -r requirements-gpu-aot.txt")


@needs_cuda_plugin
@pytest.mark.parametrize("shell", [{}, {"TPU_NAME": "cloud-8b"}], ids=["plain", "TPU_NAME set"])
def test_a_command_starts_without_plugin_tracebacks_on_a_cpu_host(tmp_path, shell):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # conftest sets cpu
    if accelerator_hint(env) is not None:
        pytest.skip(f"this host may have an accelerator ({accelerator_hint(env)})")
    env.update(shell)  # TPU_NAME: a shell that has used tpu_scripts/
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p", "response": "r"}\n')
    # `--mesh tensor=7` fails on the devices JAX found, before any checkpoint is read.
    done = subprocess.run([sys.executable, "-m", "cloud_jax", "score", "--checkpoint",
                           str(tmp_path / "none"), "--input", str(rows), "--output",
                           str(tmp_path / "out.jsonl"), "--mesh", "tensor=7"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "error: --mesh:" in done.stderr and "not divisible" in done.stderr, done.stderr
    assert "Jax plugin configuration error" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "TPU" not in done.stderr, done.stderr


@needs_cuda_plugin
def test_importing_jax_with_the_cuda_plugin_logs_no_missing_driver_lines():
    # The plugin's modules look for libcudart.so.12 as JAX imports them; without the CUDA runtime
    # package (nvidia-cuda-runtime-cu12 in requirements-gpu-aot.txt) each logs an absl preamble
    # and "Could not find cuda drivers", whatever JAX_PLATFORMS says. JAX still runs on the CPU.
    done = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cpu", done.stdout
    for line in ("Could not find cuda drivers", "absl::InitializeLog()"):
        assert line not in done.stderr, (
            f"importing JAX logged {line!r}: is nvidia-cuda-runtime-cu12 installed? "
            f"pip install -r requirements-gpu-aot.txt\n{done.stderr}")


HIDE_TORCH = """
import importlib.util, runpy, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: (
    None if name.split(".")[0] == "torch" else find_spec(name, *a, **k))
sys.argv = ["cloud_jax", "score", "--help"]
runpy.run_module("cloud_jax", run_name="__main__")
"""


def test_a_command_without_pytorch_installed_starts_without_transformers_notice():
    # `make demo` installs no PyTorch (only `make test` does); transformers then announced on
    # every command that "Models won't be available", though cloud_jax uses none of them.
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", HIDE_TORCH], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m cloud_jax score" in done.stdout
    assert "PyTorch was not found" not in done.stderr, done.stderr
    assert "torch" not in done.stderr, done.stderr
