"""The benchmark commands at tiny sizes on the CPU: every bench names its host (CPU model, vector
extensions), and the GPU code paths (bf16, transformers on the same device, presets) run here too."""

import json
import os
import re
import sys
import warnings

import jax
import pytest

from cloud_jax.cli.bench.host import host_info, host_line
from cloud_jax.model import cpu_kernels

AVX2_HOST = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
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
    assert info["cpu_signature"] == "family 23 model 49"
    assert "family 23 model 49" in host_line(info)
    assert info["backend"] == "cpu"


def test_the_host_line_says_when_the_machine_is_busy(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(AVX2_HOST)
    info = host_info(str(path))
    quiet = dict(info, cpu_count=2, load_average=0.1, cpu_busy=None)
    busy = dict(info, cpu_count=2, load_average=3.4, cpu_busy=None)
    assert "load average 0.10" in host_line(quiet) and "busy" not in host_line(quiet)
    assert "load average 3.40" in host_line(busy) and "busy" in host_line(busy)
    assert "load average" not in host_line(dict(info, load_average=None))


def test_the_cores_in_use_at_start_decide_busy_over_the_trailing_load_average(tmp_path,
                                                                               monkeypatch):
    from cloud_jax.cli.bench import host

    info = dict(host_info(str(tmp_path / "absent")), cpu_count=2)
    # A bench just finished: the load average still counts it, the cores are idle now.
    after_a_run = dict(info, load_average=1.8, cpu_busy=0.02)
    assert "2% of the cores busy" in host_line(after_a_run) and "busy:" not in host_line(after_a_run)
    shared = dict(info, load_average=0.1, cpu_busy=0.6)
    assert "60% of the cores busy" in host_line(shared) and "busy:" in host_line(shared)
    # Where the share is unknown, the load average decides as before.
    assert "busy:" in host_line(dict(info, load_average=1.8, cpu_busy=None))

    stat = tmp_path / "stat"
    lines = iter(["cpu  100 0 100 700 100 0 0 0 0 0\n",    # busy 200 of 1000 ticks
                  "cpu  160 0 140 800 100 0 0 0 0 0\n"])   # then +100 busy, +100 idle
    read = host._cpu_times

    def changing(path):
        stat.write_text(next(lines))
        return read(path)

    monkeypatch.setattr(host, "_cpu_times", changing)
    monkeypatch.setattr(host, "_own_cpu_seconds", lambda: 0.0)
    assert host.cpu_busy(interval=0.0, path=str(stat)) == 0.5
    # This process's own CPU time is not other work's: 100 busy ticks, all of them its own.
    lines = iter(["cpu  100 0 100 700 100 0 0 0 0 0\n", "cpu  160 0 140 800 100 0 0 0 0 0\n"])
    used = iter([5.0, 5.0 + 100 / os.sysconf("SC_CLK_TCK")])
    monkeypatch.setattr(host, "_own_cpu_seconds", lambda: next(used))
    assert host.cpu_busy(interval=0.0, path=str(stat)) == 0.0
    monkeypatch.undo()
    stat.write_text("cpu  1 0 1 8 0 0 0 0 0 0\n")  # no ticks pass: unknown, not 0
    assert host.cpu_busy(interval=0.0, path=str(stat)) is None
    assert host.cpu_busy(interval=0.0, path=str(tmp_path / "absent")) is None
    if sys.platform == "linux":
        assert 0.0 <= host.cpu_busy(interval=0.05) <= 1.0


def test_an_arm_host_lists_its_vector_units(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ARM_HOST)
    info = host_info(str(path))
    assert info["vector_extensions"] == ["asimd", "sve"]
    assert info["cpu_model"]  # platform fallback, never empty
    assert info["cpu_signature"] is None


def test_an_emulated_host_is_named_on_the_host_line_and_in_the_record(tmp_path, monkeypatch):
    from cloud_jax.cli.bench.host import write_record

    monkeypatch.delenv("CLOUD_JAX_EMULATED_HOST", raising=False)
    assert host_info()["emulated_host"] is None and "emulating" not in host_line(host_info())
    monkeypatch.setenv("CLOUD_JAX_EMULATED_HOST", "an AVX2-only x86 host (a tool)")
    monkeypatch.setenv("CLOUD_JAX_KERNEL_ARCH", "x86-64-v3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    info = host_info()
    assert info["emulated_host"] == "an AVX2-only x86 host (a tool)"
    assert "emulating an AVX2-only x86 host (a tool)" in host_line(info)
    write_record(str(tmp_path / "r.json"), "python -m cloud_jax bench sample", dict(info, ratio=1.0))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["machine"].endswith("emulating an AVX2-only x86 host (a tool)")
    assert saved["environment"]["CLOUD_JAX_KERNEL_ARCH"] == "x86-64-v3"
    assert saved["environment"]["CLOUD_JAX_EMULATED_HOST"] == info["emulated_host"]
    assert "OMP_NUM_THREADS" not in saved["environment"]  # only what was set


_REWRITE_UNDER_A_SIZE_LIMIT = """
import resource, signal, sys
from cloud_jax.cli.bench.host import write_record
write_record(sys.argv[1], "first", {"ours": 1})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
try:
    write_record(sys.argv[1], "second", {"ours": 2, "padding": "x" * 8192})
except OSError as err:
    print("write failed:", err.strerror)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as on Linux")
def test_a_record_is_replaced_whole_or_left_as_it_was(tmp_path):
    """--record writes through a temporary file and a rename: a rewrite that stops part way (a
    full disk, here a file-size limit; a time limit's kill) leaves the record that was there,
    whole, for tools/gpu_benches.sh to read."""
    import subprocess
    from pathlib import Path

    path = tmp_path / "gpu_sample_32.json"
    done = subprocess.run([sys.executable, "-c", _REWRITE_UNDER_A_SIZE_LIMIT, str(path)],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "write failed" in done.stdout
    saved = json.loads(path.read_text())
    assert saved["command"] == "first" and saved["result"] == {"ours": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_a_missing_cpuinfo_still_describes_the_host(tmp_path):
    info = host_info(str(tmp_path / "absent"))
    assert info["cpu_model"] and info["vector_extensions"] == []
    json.dumps(info)


def test_bench_sample_prints_the_host_and_puts_it_in_its_json(capsys):
    from cloud_jax.cli.bench import sample

    assert sample.main(["--inputs", "1", "--samples", "2", "--prompt-len", "8", "--new-tokens",
                        "4", "--repeats", "1", "--hidden-size", "32", "--num-layers", "1",
                        "--num-heads", "2", "--num-kv-heads", "1", "--intermediate-size", "64",
                        "--vocab-size", "64", "--skip-hf", "--bandwidth-bytes",
                        str(1 << 24), "--steps-per-check", "2"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    # Without transformers' run: no ratio, and the line stays strict JSON (null, not NaN).
    assert result["hf_critiques_per_s"] is None and result["ratio"] is None
    json.loads(out.strip().splitlines()[-1], parse_constant=lambda name: pytest.fail(name))
    # 4 new tokens: 5 steps up to the end, run in checks of 2, so 6 steps timed.
    assert result["steps_per_check"] == 2 and result["decode_steps"] == 6
    assert result["decode_phases"] == 4
    assert "decode: 6 steps (5 up to the last row's end, which is checked every 2 steps)" in out
    # The operations a step launches, from the compiled loop: an iteration holds 2 steps.
    lo, hi = map(int, re.search(r"operations a step \((\d+)-(\d+) per iteration of its \d+ "
                                r"loop\(s\), 2 step\(s\) each\)", out).groups())
    assert lo <= 2 * result["decode_ops_per_step"] <= hi and lo > 10
    assert result["decode_us_per_op"] == pytest.approx(
        1e3 * result["decode_step_ms"] / result["decode_ops_per_step"], rel=1e-2)
    assert result["cpu_model"] == host_info()["cpu_model"]
    assert result["vector_extensions"] == host_info()["vector_extensions"]
    assert "load_average" in result and "cpu_signature" in result
    assert "[bench sample] host: " in out
    assert result["decode_layout"] == "feature_major" and result["prepare_s"] >= 0
    assert "feature_major decode layout" in out
    kernel = cpu_kernels._compiler() is not None  # built wherever a C++ compiler is
    assert result["decode_attention"] == ("cpu_kernel" if kernel else "xla")
    assert f"{result['decode_attention']} decode attention" in out
    assert result["decode_matmul"] == ("cpu_kernel" if kernel else "xla")
    assert f"{result['decode_matmul']} decode matmul" in out
    avx512 = "avx512f" in host_info()["vector_extensions"]
    assert result["kernel_vector_floats"] == ((16 if avx512 else 8) if kernel else None)
    assert (f"({result['kernel_vector_floats']}-float vectors)" in out) == kernel
    # The critiques' hash: the same for the decode checked every step (it changes how the loop
    # runs, not what it writes), another for another temperature.
    assert re.fullmatch(r"[0-9a-f]{16}", result["critiques_sha256"])
    assert f"(tokens sha256 {result['critiques_sha256']})" in out
    hashes = {}
    for extra in (["--steps-per-check", "1"], ["--temperature", "0.3"]):
        assert sample.main(TINY_SAMPLE + ["--new-tokens", "4", "--skip-hf"] + extra) == 0
        hashes[extra[0]] = json.loads(
            capsys.readouterr().out.strip().splitlines()[-1])["critiques_sha256"]
    assert hashes["--steps-per-check"] == result["critiques_sha256"]
    assert hashes["--temperature"] != result["critiques_sha256"]


def test_the_gpu_preset_is_the_1b_workload_and_explicit_flags_win():
    from cloud_jax.cli.bench.sample import parse_args

    args = parse_args(["--preset", "llama-1b"])
    assert (args.hidden_size, args.num_layers, args.num_heads, args.num_kv_heads,
            args.intermediate_size, args.vocab_size) == (2048, 16, 32, 8, 8192, 128256)
    assert (args.inputs, args.samples, args.prompt_len, args.new_tokens) == (32, 8, 1024, 256)
    assert args.dtype == "bfloat16"
    assert parse_args(["--inputs", "8", "--preset", "llama-1b"]).inputs == 8
    assert parse_args([]).dtype == "float32" and parse_args([]).inputs == 2


def test_bench_sample_in_bf16_against_transformers_on_the_same_device(capsys):
    """The GPU path (bf16 weights, transformers on JAX's device) at a tiny size on the CPU."""
    from cloud_jax.cli.bench import sample

    assert sample.main(["--inputs", "2", "--samples", "2", "--prompt-len", "8", "--new-tokens",
                        "4", "--repeats", "1", "--hidden-size", "32", "--num-layers", "1",
                        "--num-heads", "2", "--num-kv-heads", "1", "--intermediate-size", "64",
                        "--vocab-size", "64", "--dtype", "bfloat16", "--backend", "cpu",
                        "--threads", "1", "--bandwidth-bytes", str(1 << 24),
                        "--decode-layout", "standard"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["dtype"] == "bfloat16" and result["backend"] == "cpu"
    assert result["decode_layout"] == "standard" and result["prepare_s"] == 0
    assert result["decode_attention"] == "xla" and result["kernel_vector_floats"] is None
    assert result["hf_critiques_per_s"] > 0 and result["ratio"] > 0
    assert result["decode_step_over_hbm_floor"] > 0
    assert "transformers generate (cpu" in out


def test_bench_sample_with_the_pallas_decode_attention(capsys):
    """--decode-attention-impl pallas (tools/gpu_benches.sh's sample_32_pallas) at a tiny size:
    the kernel's interpreter on the CPU (its K = 1 comparison run too), named in the JSON and
    the printed line, and checked against XLA's attention at both K; auto is XLA's here. (The interpreter's loops are
    more operations on the CPU; on a GPU the kernel is one a layer: tests/test_gpu_kernels.py.)"""
    from cloud_jax.cli.bench import sample

    tiny = ["--inputs", "2", "--samples", "8", "--prompt-len", "16", "--new-tokens", "16",
            "--repeats", "1", "--hidden-size", "64", "--num-layers", "1", "--num-heads", "4",
            "--num-kv-heads", "2", "--intermediate-size", "64", "--vocab-size", "64",
            "--backend", "cpu", "--bandwidth-bytes", str(1 << 20), "--skip-hf",
            "--decode-layout", "standard", "--decode-phases", "1"]
    results = {}
    for impl in ("xla", "pallas", "auto"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert sample.main(tiny + ["--decode-attention-impl", impl]) == 0
        out = capsys.readouterr().out
        results[impl] = json.loads(out.strip().splitlines()[-1])
        assert f"{'xla' if impl == 'auto' else impl} decode attention" in out
        assert not [w for w in caught if "decode_attention_impl" in str(w.message)]
    assert results["pallas"]["decode_attention"] == "pallas"
    # auto: the kernel on an NVIDIA GPU only; on this CPU, XLA's attention, named as such.
    assert results["xla"]["decode_attention"] == results["auto"]["decode_attention"] == "xla"
    assert results["auto"]["pallas_max_abs_diff"] is None
    # The kernel checked against XLA's attention on the machine it ran on (fp32 here).
    assert 0 <= results["pallas"]["pallas_max_abs_diff"] < 1e-5
    assert results["xla"]["pallas_max_abs_diff"] is None
    # 2 inputs x 2 KV heads: 4 programs, so each input's 16-key prompt in 1 part (1 block).
    assert results["pallas"]["pallas_parts"] == 1 and results["xla"]["pallas_parts"] is None
    # The same model, prompts and seed: the same critiques, so the loops ran as many steps.
    assert results["pallas"]["decode_steps"] == results["xla"]["decode_steps"]


def test_bench_train_in_bf16_over_fp32_masters_agrees_with_torch_autocast(capsys, tmp_path):
    from cloud_jax.cli.bench import train

    record = tmp_path / "measurements" / "train.json"
    assert train.main(["--record", str(record), "--pairs", "1", "--seq", "16", "--hidden", "32", "--layers", "1",
                       "--heads", "2", "--kv-heads", "1", "--mlp", "64", "--vocab", "64",
                       "--repeats", "1", "--steps", "1", "--threads", "1", "--dtype", "bfloat16",
                       "--backend", "cpu", "--matmul-n", "128", "--lm-chunk", "0"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["dtype"] == "bfloat16" and 0 < result["mfu"] and result["ratio"] > 0
    assert result["cpu_model"] == host_info()["cpu_model"]
    # The same weights and batch: both first losses agree to bf16 precision.
    ours, torch_ = (float(line.rsplit("first loss ", 1)[1]) for line in out.splitlines()
                    if line.startswith(("ours:", "torch:")))
    assert abs(ours - torch_) < 2e-2 * abs(ours), (ours, torch_)
    saved = json.loads(record.read_text())
    assert saved["result"] == result
    assert saved["command"].startswith("python -m cloud_jax bench train --record")
    assert saved["date"][:2] == "20" and host_info()["cpu_model"] in saved["machine"]
    assert saved["versions"]["jax"] == jax.__version__ and saved["versions"]["python"]


# bench sample at a tiny size on the CPU (1 input x K = 2, 2 new tokens).
TINY_SAMPLE = ["--inputs", "1", "--samples", "2", "--prompt-len", "8", "--new-tokens", "2",
               "--repeats", "1", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
               "--num-kv-heads", "1", "--intermediate-size", "64", "--vocab-size", "64",
               "--backend", "cpu", "--bandwidth-bytes", str(1 << 20)]
TINY_TRAIN = ["--pairs", "1", "--seq", "16", "--hidden", "32", "--layers", "1", "--heads", "2",
              "--kv-heads", "1", "--mlp", "64", "--vocab", "64", "--repeats", "1", "--steps", "1",
              "--threads", "1", "--dtype", "bfloat16", "--backend", "cpu", "--matmul-n", "128",
              "--lm-chunk", "0"]


def _first_losses(out):
    return [float(line.rsplit("first loss ", 1)[1]) for line in out.splitlines()
            if line.startswith(("ours:", "torch:"))]


def test_bench_train_runs_the_frameworks_one_after_the_other_as_on_a_gpu(capsys):
    """--phases sequential, the GPU default: torch's rounds alone, its memory released, then
    ours; the same step and numbers as interleaved rounds."""
    from cloud_jax.cli.bench import train

    assert train.main(TINY_TRAIN + ["--phases", "sequential"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["phases"] == "sequential" and result["torch_error"] is None
    assert result["ratio"] > 0 and result["mfu"] > 0
    ours, torch_ = _first_losses(out)
    assert abs(ours - torch_) < 2e-2 * abs(ours), (ours, torch_)
    peaks = out.split("matmul 128^3:")[1].splitlines()[0]  # both frameworks' matmuls measured
    assert "torch" in peaks and "jax" in peaks


def test_cudnn_attention_that_cannot_run_is_reported_and_xla_measured(capsys):
    """--attention cudnn (the GPU preset's) where the cuDNN call cannot run, as on this CPU: the
    run says why and measures ours with XLA's attention instead of stopping. Without cuDNN the
    reason is its absence; with cuDNN installed (requirements-gpu-aot.txt), that the CPU has no
    such operation."""
    from cloud_jax.cli.bench import train

    assert train.main(TINY_TRAIN + ["--skip-torch", "--attention", "cudnn"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["attention"] == "xla"
    assert re.search(r"cuDNN|'dot_product_attention\w*' not found for platform cpu",
                     result["attention_error"]), result["attention_error"]
    assert result["mfu"] > 0
    assert "ours with cuDNN attention failed" in out


def test_torch_running_out_of_device_memory_is_reported_and_ours_still_measured(
        capsys, monkeypatch):
    import torch

    from cloud_jax.cli.bench import train

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(train, "torch_step", out_of_memory)
    assert train.main(TINY_TRAIN + ["--phases", "sequential"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["torch_error"] == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert result["ratio"] is None and result["torch_tokens_per_s"] is None
    assert result["mfu"] > 0 and result["ours_tokens_per_s"] > 0
    assert "torch ran out of device memory" in out


def test_transformers_running_out_of_memory_leaves_our_sampling_numbers(capsys, monkeypatch):
    import torch

    from cloud_jax.cli.bench import sample

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 10.70 GiB")

    monkeypatch.setattr(sample, "transformers_critiques_per_s", out_of_memory)
    assert sample.main(TINY_SAMPLE + ["--decode-layout", "standard"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["hf_error"] == "out of memory: CUDA out of memory. Tried to allocate 10.70 GiB"
    assert result["ours_critiques_per_s"] > 0 and result["decode_step_ms"] > 0
    assert result["steps_per_check"] == 1 and result["decode_steps"] == 3
    assert "ran out of GPU memory" in out


def test_transformers_failing_otherwise_leaves_our_numbers_and_the_record(capsys, monkeypatch,
                                                                          tmp_path):
    """Not only running out of memory: torch that will not import or finds no GPU, or logits
    that differ, come after our sampling was measured; the record is still written."""
    from cloud_jax.cli.bench import sample

    def broken(*args, **kwargs):
        raise RuntimeError("JAX runs on a GPU but torch sees no CUDA device\nmore")

    monkeypatch.setattr(sample, "transformers_critiques_per_s", broken)
    record = tmp_path / "sample.json"
    assert sample.main(TINY_SAMPLE + ["--decode-layout", "standard", "--record",
                                      str(record)]) == 0
    out = capsys.readouterr().out
    result = json.loads(record.read_text())["result"]
    assert result["hf_error"] == "RuntimeError: JAX runs on a GPU but torch sees no CUDA device"
    assert result["ratio"] is None and result["hf_critiques_per_s"] is None
    assert result["ours_critiques_per_s"] > 0 and result["decode_step_over_hbm_floor"] > 0
    assert "transformers did not run" in out


def test_our_sampling_is_recorded_before_transformers_runs(capsys, monkeypatch, tmp_path):
    """A run stopped while transformers generates (the device script's time limit) keeps our
    numbers: the record is written before transformers starts, then again with the ratio."""
    from cloud_jax.cli.bench import sample

    record = tmp_path / "sample.json"
    seen = {}

    def transformers_at_two_per_s(*args, **kwargs):
        seen.update(json.loads(record.read_text())["result"])
        return 2.0

    monkeypatch.setattr(sample, "transformers_critiques_per_s", transformers_at_two_per_s)
    assert sample.main(TINY_SAMPLE + ["--decode-layout", "standard", "--record",
                                      str(record)]) == 0
    assert seen["hf_error"].startswith("not finished") and seen["ratio"] is None
    assert seen["ours_critiques_per_s"] > 0 and seen["decode_step_over_hbm_floor"] > 0
    result = json.loads(record.read_text())["result"]
    assert result["hf_error"] is None and result["hf_critiques_per_s"] == 2.0
    # The ratio is of the unrounded rates: within rounding of the recorded ones.
    assert result["ratio"] == pytest.approx(result["ours_critiques_per_s"] / 2.0, abs=2e-3)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_torch_failing_before_ours_still_measures_ours_and_writes_the_record(
        capsys, monkeypatch, tmp_path):
    """--phases sequential runs torch first: a torch step that fails for any reason (an import
    error, a CUDA error) must not cost the MFU measured after it."""
    from cloud_jax.cli.bench import train

    def broken(*args, **kwargs):
        raise ImportError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(train, "torch_step", broken)
    record = tmp_path / "train.json"
    assert train.main(TINY_TRAIN + ["--phases", "sequential", "--record", str(record)]) == 0
    out = capsys.readouterr().out
    result = json.loads(record.read_text())["result"]
    assert result["torch_error"] == "ImportError: libcudnn.so.9: cannot open shared object file"
    assert result["ratio"] is None and result["mfu"] > 0
    assert "torch's step did not run" in out


def test_torch_failing_in_interleaved_rounds_still_measures_ours(capsys, monkeypatch, tmp_path):
    """The CPU's default phases build torch's step after ours: torch that will not import or
    build there is reported (torch_error, no ratio), not a traceback that loses ours."""
    from cloud_jax.cli.bench import train

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'torch'")

    monkeypatch.setattr(train, "torch_step", broken)
    record = tmp_path / "train.json"
    assert train.main(TINY_TRAIN + ["--phases", "interleaved", "--record", str(record)]) == 0
    out = capsys.readouterr().out
    result = json.loads(record.read_text())["result"]
    assert result["torch_error"] == "ModuleNotFoundError: No module named 'torch'"
    assert result["ratio"] is None and result["torch_tokens_per_s"] is None
    assert result["mfu"] > 0 and result["phases"] == "interleaved"
    assert "torch's step did not run" in out


def test_backend_gpu_is_checked_not_pinned_and_jax_shares_the_gpu_with_torch(monkeypatch):
    """JAX expands the platform name "gpu" to cuda, rocm and oneapi and fails on the first
    plugin that is missing, so --backend gpu never pins it: JAX's own choice is checked. Before
    that, JAX is told not to take 75% of the GPU at start (torch runs on the same device)."""
    import pytest

    from cloud_jax.cli.bench.host import select_backend

    for name in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_CLIENT_MEM_FRACTION",
                 "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    before = jax.config.jax_platforms
    with pytest.raises(SystemExit, match="--backend gpu: JAX found no gpu here, only cpu"):
        select_backend("gpu")
    assert jax.config.jax_platforms == before
    import os

    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert os.environ["XLA_CLIENT_MEM_FRACTION"] == "0.90"
    select_backend("cpu")  # the platform this process runs on: no error
    # A value the user set wins; the deprecated fraction name is not joined by the new one (JAX
    # refuses both at once).
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".5")
    select_backend(None)
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    assert "XLA_CLIENT_MEM_FRACTION" not in os.environ


_REFUSE_BUNDLED = """
import importlib.abc, runpy, sys
blocked = set(sys.argv[1].split(","))
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is not on the GPU image (refused by the test)")
sys.meta_path.insert(0, Refuse())
sys.argv = ["cloud_jax"] + sys.argv[2:]
runpy.run_module("cloud_jax", run_name="__main__")
"""


def test_the_benches_need_nothing_the_gpu_image_lacks(tmp_path):
    """The bench device call carries no packages: with every module of the offline bundle's
    packages (tools/offline_bundle.py, what the GPU image lacks) refused, both benches run."""
    import importlib.metadata
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tools"))
    try:
        from offline_bundle import PACKAGES
    finally:
        sys.path.remove(str(root / "tools"))
    wanted = {name.lower().replace("_", "-") for name in PACKAGES}
    modules = {module for module, dists in importlib.metadata.packages_distributions().items()
               if any(d.lower().replace("_", "-") in wanted for d in dists)}
    assert {"omegaconf", "tensorflow_datasets", "grain", "gguf"} <= modules
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for command in (
            ["bench", "train", *TINY_TRAIN, "--skip-torch", "--phases", "sequential"],
            ["bench", "sample", *TINY_SAMPLE, "--skip-hf"]):
        done = subprocess.run([sys.executable, "-c", _REFUSE_BUNDLED, ",".join(sorted(modules)),
                               *command], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["backend"] == "cpu"


def _check_profile(summary, trace_dir):
    from pathlib import Path

    assert Path(summary["trace"]).is_file() and str(trace_dir) in summary["trace"]
    assert summary["source"] == "host" and summary["total_ms"] > 0  # a CPU's thunks
    assert summary["top"] and all(row["ms"] > 0 for row in summary["top"])
    assert [row["ms"] for row in summary["top"]] == sorted((row["ms"] for row in summary["top"]),
                                                           reverse=True)
    assert 0 < sum(row["share"] for row in summary["by_kind"]) <= 1.0001
    # A kind's time is at least that of its largest operation.
    kinds = {row["kind"]: row["ms"] for row in summary["by_kind"]}
    top = summary["top"][0]
    assert kinds[top["op"].rsplit(".", 1)[0] if top["op"].rsplit(".", 1)[-1].isdigit()
                 else top["op"]] >= top["ms"]


def test_profile_traces_one_step_and_says_where_its_time_went(capsys, tmp_path):
    """--profile: the summary a run on a lent GPU brings back (here from XLA:CPU's events)."""
    from cloud_jax.cli.bench import sample, train

    assert train.main(TINY_TRAIN + ["--skip-torch", "--profile", str(tmp_path / "train")]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    _check_profile(result["profile"], tmp_path / "train")
    assert "profile of one step of ours:" in out and "by kind:" in out
    assert sample.main(TINY_SAMPLE + ["--skip-hf", "--profile", str(tmp_path / "sample")]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    _check_profile(result["profile"], tmp_path / "sample")
    assert "profile of one decode loop:" in out


def test_a_profile_that_fails_is_reported_and_the_measurements_still_written(
        capsys, tmp_path, monkeypatch):
    """A profiler refused on the lent machine must not cost the run its record."""
    from cloud_jax.cli.bench import profile, sample, train

    def refused(fn, log_dir):
        fn()
        raise RuntimeError("CUPTI_ERROR_INSUFFICIENT_PRIVILEGES\nmore detail")

    monkeypatch.setattr(profile, "trace", refused)
    record = tmp_path / "train.json"
    assert train.main(TINY_TRAIN + ["--skip-torch", "--profile", str(tmp_path / "t"),
                                    "--record", str(record)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    error = "RuntimeError: CUPTI_ERROR_INSUFFICIENT_PRIVILEGES"
    assert result["profile"] == {"error": error, "trace_dir": str(tmp_path / "t")}
    assert result["ours_tokens_per_s"] > 0
    assert json.loads(record.read_text())["result"]["profile"]["error"] == error
    assert f"profile of one step of ours: not taken ({error})" in out
    record = tmp_path / "sample.json"
    assert sample.main(TINY_SAMPLE + ["--skip-hf", "--profile", str(tmp_path / "s"),
                        "--record", str(record)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["profile"]["error"] == error and result["ours_critiques_per_s"] > 0
    assert json.loads(record.read_text())["result"]["decode_step_ms"] > 0
    assert f"[bench sample] profile of one decode loop: not taken ({error})" in out


def test_the_train_preset_is_the_1b_workload():
    from cloud_jax.cli.bench.train import parse_args

    args = parse_args(["--preset", "llama-1b"])
    assert (args.hidden, args.layers, args.heads, args.kv_heads, args.mlp, args.vocab,
            args.seq) == (2048, 16, 32, 8, 8192, 128256, 2048)
    assert args.dtype == "bfloat16" and args.matmul_n == 8192 and args.pairs == 2
    assert args.phases is None  # sequential on a GPU, interleaved on a CPU
    assert args.attention == "cudnn" and parse_args([]).attention == "xla"
    assert parse_args(["--preset", "llama-1b", "--seq", "512"]).seq == 512


def test_bench_serve_small_runs_both_modes_over_http(capsys, tmp_path):
    from cloud_jax.cli.bench import serve

    record = tmp_path / "serve.json"
    assert serve.main(["--small", "--requests", "6", "--record", str(record)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("continuous_critiques_per_s", "static_critiques_per_s", "ratio", "p50_s",
                "p99_s"):
        assert result[key] > 0, key
    assert result["ratio"] == (result["continuous_critiques_per_s"]
                               / result["static_critiques_per_s"])
    assert "[bench serve] host: " in out and "continuous:" in out and "static:" in out
    assert json.loads(record.read_text())["result"]["requests"] == 6


def test_bench_serve_servers_are_limited_to_the_workloads_largest_budget(monkeypatch):
    # The continuous engine sizes every row's decode cache for the server's budget limit: the
    # bench sets it to its own largest budget, not the server's default of 1024.
    from cloud_jax.cli.bench import serve

    commands = []

    def popen(cmd, **kwargs):
        commands.append(cmd)
        raise OSError("not started")

    monkeypatch.setattr(serve.subprocess, "Popen", popen)
    for argv, limit in (([], 256), (["--small"], 24), (["--max-tokens", "100"], 100)):
        args = serve.parse_args(argv)
        for mode in ("static", "continuous"):
            with pytest.raises(OSError, match="not started"):
                serve._serve("model", mode, args)
            cmd = commands[-1]
            assert "--max-critique-tokens-limit" in cmd, cmd
            assert cmd[cmd.index("--max-critique-tokens-limit") + 1] == str(limit)
            assert cmd[cmd.index("--max-critique-tokens") + 1] == str(limit)
        assert max(b["max_critique_tokens"] for b in serve._workload(args)) <= limit


def test_two_traces_into_one_directory_each_read_their_own(tmp_path):
    import jax.numpy as jnp

    from cloud_jax.cli.bench import profile

    small = jax.jit(lambda x: jnp.tanh(x).sum())
    big = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((256, 256))
    small(x).block_until_ready(), big(x).block_until_ready()
    first = profile.summary(profile.trace(lambda: small(x).block_until_ready(), str(tmp_path)))
    second = profile.summary(profile.trace(lambda: big(x).block_until_ready(), str(tmp_path)))
    assert first["total_ms"] > 0 and second["total_ms"] > 0
    assert not any("dot" in row["op"] for row in first["top"])
    assert any(row["op"].startswith(("dot", "ynn")) for row in second["top"]), second["top"]


def test_the_kept_measurements_are_records_that_say_how_they_were_taken():
    """docs/measurements/ holds one record per run (docs/measurements/README.md): a file there
    that lost a field, or an emulated run that does not say so, would be quoted as a real one."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "docs" / "measurements"
    records = sorted(folder.glob("*.json"))
    assert records
    for path in records:
        record = json.loads(path.read_text())
        assert {"date", "machine", "command", "versions", "result"} <= set(record), path.name
        assert record["command"].startswith("python -m cloud_jax "), path.name
        result = record["result"]
        emulated = result.get("emulated_host")
        assert ("emulated" in path.name) == bool(emulated), path.name
        if emulated:
            assert record["machine"].endswith(f"emulating {emulated}"), path.name
            assert record["environment"]["CLOUD_JAX_EMULATED_HOST"] == emulated, path.name


def test_every_kept_record_is_quoted_and_every_quoted_record_is_kept():
    """docs/measurements/README.md: the docs quote these files. A record no doc names is a number
    nobody can find from the text, and a name (or `*`/`{1,2}` pattern) that matches no file is a
    number whose record is gone."""
    import fnmatch
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    kept = {path.name for path in (root / "docs" / "measurements").glob("*.json")}
    quoted = set()
    for doc in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        for name in re.findall(r"docs/measurements/([\w.*{},-]+\.json)", doc.read_text()):
            braces = re.search(r"\{([^}]*)\}", name)
            patterns = ([name[:braces.start()] + part + name[braces.end():]
                         for part in braces.group(1).split(",")] if braces else [name])
            for pattern in patterns:
                found = fnmatch.filter(kept, pattern)
                assert found, f"{doc.relative_to(root)} quotes {pattern}: no such record"
                quoted.update(found)
    assert kept - quoted == set(), "records no doc quotes"



_NUMBER_WORDS = dict(zip("one two three four five six seven eight nine ten".split(), range(1, 11)))


def _count(word):
    return int(word) if word.isdigit() else _NUMBER_WORDS[word.lower()]


def test_what_docs_benchmarks_says_of_its_target_tables_is_what_the_rows_show():
    """docs/BENCHMARKS.md: a table of runs that ends in a `target` row is followed by what the runs
    met ("Every run meets the three targets", "on five runs of eight"); that sentence is checked
    against the rows, each value against its column's target (a run without a value, such as the
    ratio of a --skip-hf run, is not counted for that target)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md").read_text()
    lines = text.splitlines()
    checked = 0
    for end, line in enumerate(lines):
        if not line.startswith("| target |"):
            continue
        start = end
        while lines[start - 1].startswith("|"):
            start -= 1
        cells = [[c.strip().strip("*") for c in row.strip().strip("|").split("|")]
                 for row in lines[start:end + 1]]
        header, rows, target = cells[0], cells[2:-1], cells[-1]
        goals = {}
        for col, (name, goal) in enumerate(zip(header, target)):
            if col and goal:
                op, value = goal.split()
                kind = ("floor" if "floor" in name else "ratio" if name == "ratio"
                        else "k8" if name.startswith("K = 8") else name)
                goals[kind] = (col, op, float(value))
        assert set(goals) == {"floor", "ratio", "k8"}, (end + 1, header)

        def met(kind, goal=goals):
            col, op, value = goal[kind]
            values = [float(row[col].split()[0]) for row in rows if row[col]]
            return sum(v <= value if op == "≤" else v >= value for v in values), len(values)

        first = end + 1  # the first paragraph after the table (past a JSON line) says what it met
        while not lines[first].strip() or lines[first].startswith("    "):
            first += 1
        last = first
        while last < len(lines) and lines[last].strip():
            last += 1
        after = " ".join(lines[first:last])
        said = False
        if re.match(r"(Every run meets|All \w+ meet) the three targets", after):
            assert all(met(k)[0] == met(k)[1] for k in goals), (end + 1, {k: met(k) for k in goals})
            said = True
        if re.search(r"The ratio and K = 8 / K = 1 meet their targets on every run", after):
            assert met("ratio")[0] == met("ratio")[1] and met("k8")[0] == met("k8")[1], end + 1
            said = True
        m = re.search(r"its floor on (\w+) runs of (\w+)", after)
        if m:
            assert (_count(m.group(1)), _count(m.group(2))) == met("floor"), (end + 1, m.group(0))
            said = True
        assert said, f"docs/BENCHMARKS.md line {end + 1}: a target table with no word on its runs"
        checked += 1
    assert checked >= 5


def test_the_gpu_presets_and_their_config_agree():
    """configs/llama_1b_bench.yaml (what `aot` compiles for the GPU, docs/BENCHMARKS.md) is the
    model and training batch of the benches' llama-1b preset."""
    from cloud_jax.cli.bench import sample, train
    from cloud_jax.training.config import load_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                   "llama_1b_bench.yaml"))
    m, t, s = cfg.model, train.PRESETS["llama-1b"], sample.PRESETS["llama-1b"]
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.intermediate_size,
            m.vocab_size) == (t["hidden"], t["layers"], t["heads"], t["kv_heads"], t["mlp"],
                              t["vocab"])
    assert all(getattr(m, k) == s[k] for k in ("hidden_size", "num_layers", "num_heads",
                                                "num_kv_heads", "intermediate_size", "vocab_size"))
    assert m.tie_word_embeddings and m.dtype == t["dtype"] == s["dtype"] == "bfloat16"
    assert m.attention_impl == t["attention"] and m.param_dtype == "float32"
    assert (cfg.data.batch_pairs, cfg.data.max_length) == (t["pairs"], t["seq"])
    assert cfg.train.stage == "cloud" and cfg.loss.lm_coef == train.LM_COEF


@pytest.mark.parametrize("command,flag,value", [
    ("sample", "--samples", "0"), ("sample", "--inputs", "0"), ("sample", "--repeats", "0"),
    ("train", "--steps", "0"), ("train", "--pairs", "0"),
    ("serve", "--clients", "0"), ("serve", "--modes", "stati"),
    # Values that failed only after the timing (a division by a zero bandwidth or peak), or
    # with a traceback (a temperature the sampler or the server refuses).
    ("sample", "--bandwidth-bytes", "0"), ("sample", "--bandwidth-bytes", "-8"),
    ("sample", "--temperature", "0"), ("sample", "--temperature", "nan"),
    ("train", "--matmul-n", "0"), ("train", "--lm-chunk", "-1"),
    ("serve", "--temperature", "-1")])
def test_a_count_below_one_or_an_unknown_mode_is_a_usage_error(command, flag, value, capsys):
    """Refused when the flags are read, before a model is built: not a traceback deep in the
    run, nor (--pairs 0) a result that measured nothing."""
    import importlib

    module = importlib.import_module(f"cloud_jax.cli.bench.{command}")
    args = {"sample": TINY_SAMPLE, "train": TINY_TRAIN, "serve": ["--small"]}[command]
    with pytest.raises(SystemExit) as exc:
        module.parse_args(args + [flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
