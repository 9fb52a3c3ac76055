"""Every benchmark says what host it ran on: CPU model and vector extensions."""

import json

from cloud_jax.cli.bench.host import host_info, host_line

AVX2_HOST = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse4_2 avx avx2 fma bmi2
processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse4_2 avx avx2 fma bmi2
"""

ARM_HOST = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes sve
CPU implementer\t: 0x41
"""


def test_an_avx2_only_host_is_named_with_its_extensions(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(AVX2_HOST)
    info = host_info(str(path))
    assert info["cpu_model"] == "AMD EPYC 7B12"
    assert info["vector_extensions"] == ["sse4_2", "avx", "avx2", "fma"]
    assert "avx512f" not in host_line(info)
    assert "AMD EPYC 7B12" in host_line(info) and "avx2" in host_line(info)
    assert info["backend"] == "cpu"


def test_an_arm_host_lists_its_vector_units(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ARM_HOST)
    info = host_info(str(path))
    assert info["vector_extensions"] == ["asimd", "sve"]
    assert info["cpu_model"]  # platform fallback, never empty


def test_a_missing_cpuinfo_still_describes_the_host(tmp_path):
    info = host_info(str(tmp_path / "absent"))
    assert info["cpu_model"] and info["vector_extensions"] == []
    json.dumps(info)


def test_bench_sample_prints_the_host_and_puts_it_in_its_json(capsys):
    from cloud_jax.cli.bench import sample

    assert sample.main(["--inputs", "1", "--samples", "2", "--prompt-len", "8", "--new-tokens",
                        "4", "--repeats", "1", "--hidden-size", "32", "--num-layers", "1",
                        "--num-heads", "2", "--num-kv-heads", "1", "--intermediate-size", "64",
                        "--vocab-size", "64", "--skip-hf"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["cpu_model"] == host_info()["cpu_model"]
    assert result["vector_extensions"] == host_info()["vector_extensions"]
    assert "[bench sample] host: " in out
