"""When ``train.distributed=auto`` calls ``jax.distributed.initialize()``: a coordinator address,
a GKE TPU slice, a SLURM job, or a Cloud TPU VM slice (which sets no variable: its metadata
server lists the workers, as JAX's own cluster detection reads them)."""

import pytest

from cloud_jax import sharding

VARIABLES = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS")


@pytest.fixture
def bare(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_environment_variables_name_a_multi_host_job(bare):
    bare.setattr(sharding, "_tpu_vm_slice_workers", lambda: 0)
    assert not sharding._multi_host_environment()
    for name, value in (("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234"),
                        ("TPU_WORKER_HOSTNAMES", "w0,w1"), ("SLURM_NTASKS", "2")):
        with pytest.MonkeyPatch.context() as m:
            m.setenv(name, value)
            assert sharding._multi_host_environment(), name
    bare.setenv("TPU_WORKER_HOSTNAMES", "w0")  # one host
    assert not sharding._multi_host_environment()


def test_a_cloud_tpu_vm_slice_is_found_from_its_metadata(bare):
    import jax._src.hardware_utils as hardware_utils

    asked = []

    class Answer:
        def __init__(self, text):
            self.text = text

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return self.text.encode()

    def metadata(request, timeout):
        asked.append((request.full_url, request.headers))
        return Answer("10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5")

    bare.setattr("urllib.request.urlopen", metadata)
    # No TPU chips on the host: no network call at all.
    bare.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
    assert not sharding._multi_host_environment() and not asked
    bare.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, None))
    assert sharding._multi_host_environment()
    assert asked[0][0].endswith("/attributes/worker-network-endpoints")
    assert asked[0][1] == {"Metadata-flavor": "Google"}

    def unreachable(request, timeout):
        raise OSError("no metadata server")

    bare.setattr("urllib.request.urlopen", unreachable)
    assert not sharding._multi_host_environment()
