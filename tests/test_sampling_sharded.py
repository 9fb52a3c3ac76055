"""Sampling on 8 fake CPU devices (a 2x2x2 data/fsdp/tensor mesh) equals sampling on one.

The test runs this file as a script in a subprocess, because the fake device count must be set
before JAX starts.
"""

import json
import os
import subprocess
import sys


def _compare_on_fake_devices() -> dict:
    import jax
    import numpy as np

    import cloud_jax
    from cloud_jax.model.config import ModelConfig
    from cloud_jax.sharding import MeshConfig
    from cloud_jax.data.tokenizer import byte_tokenizer
    from cloud_jax.model import param_shapes, param_shardings
    from cloud_jax.sampling import TopP, sample
    from cloud_jax.sharding import SAMPLE_RULES, make_mesh

    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    prefixes = [[1, 5, 9, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [20], [7, 7, 30, 31, 2, 9]]
    kwargs = dict(max_new_tokens=6, stop_ids=(62, 5), num_samples=2, method=TopP(0.9, 1.5),
                  seed=3)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jax.numpy.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype),
                          param_shapes(cfg))
    single = sample(cfg, params, prefixes, **kwargs)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded_params = jax.device_put(params, param_shardings(cfg, mesh, SAMPLE_RULES))
    sharded = sample(cfg, sharded_params, prefixes, mesh=mesh, rules=SAMPLE_RULES, **kwargs)
    q_spec = sharded_params["layers_0"]["attn"]["q_proj"]["kernel"].sharding.spec
    # The scoring API on the mesh: 3 inputs become a batch of 4 rows (a multiple of data x fsdp).
    texts = (["What is 2+2?", "Hi", "Name a colour."], ["4", "Hello!", "Blue."])
    settings = dict(num_samples=2, temperature=1.0, max_critique_tokens=4, seed=1, batch_size=3)
    plain = cloud_jax.RewardModel(cfg, params, byte_tokenizer()).score(*texts, **settings)
    on_mesh = cloud_jax.RewardModel(cfg, sharded_params, byte_tokenizer(), mesh,
                                    SAMPLE_RULES).score(*texts, **settings)
    cli = _score_command_on_meshes(cloud_jax.RewardModel(cfg, params, byte_tokenizer()), texts)
    return {
        **cli,
        "score_critiques_equal": plain.critiques == on_mesh.critiques,
        "score_rewards_diff": float(np.abs(plain.sample_rewards - on_mesh.sample_rewards).max()),
        "tokens_equal": bool(np.array_equal(single.tokens, sharded.tokens)),
        "lengths_equal": bool(np.array_equal(single.lengths, sharded.lengths)),
        "rewards_diff": float(np.abs(single.rewards - sharded.rewards).max()),
        "q_spec": str(q_spec),
    }


def _score_command_on_meshes(rm, texts) -> dict:
    """``python -m cloud_jax score`` with ``--mesh`` (and without: every device on data) gives
    the numbers of the model on one device; ``--param-dtype bfloat16`` loads bf16 weights."""
    import tempfile

    import numpy as np

    from cloud_jax.cli.common import load_model
    from cloud_jax.cli.score import main

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(rm.save_pretrained(os.path.join(tmp, "ckpt")))
        rows = os.path.join(tmp, "rows.jsonl")
        with open(rows, "w") as f:
            for p, r in zip(*texts):
                f.write(json.dumps({"prompt": p, "response": r}) + "\n")
        common = ["--checkpoint", ckpt, "--input", rows, "--num-samples", "2", "--temperature",
                  "1.0", "--max-critique-tokens", "4", "--seed", "1", "--batch-size", "3"]
        settings = dict(num_samples=2, temperature=1.0, max_critique_tokens=4, seed=1,
                        batch_size=3)
        for name, extra in (("mesh_2x2x2", ["--mesh", "data=2,fsdp=2,tensor=2"]),
                            ("mesh_default", []), ("classic_tensor_4", ["--mesh", "tensor=4",
                                                                        "--classic"])):
            classic = "--classic" in extra
            k = 1 if classic else 2  # a classic model writes no critiques: K is 1
            want = rm.score(*texts, **{**settings, "num_samples": k}, classic=classic)
            path = os.path.join(tmp, f"{name}.jsonl")
            assert main(common + extra + ["--output", path, "--num-samples", str(k)]) == 0
            got = [json.loads(line) for line in open(path)]
            rewards = np.array([row["sample_rewards"] for row in got])
            out[f"{name}_rewards_diff"] = float(np.abs(rewards - want.sample_rewards).max())
            out[f"{name}_critiques_equal"] = classic or [row["critiques"] for row in got] == \
                want.critiques
        parser = __import__("argparse").ArgumentParser()
        from cloud_jax.cli.common import add_model_args

        add_model_args(parser)
        loaded = load_model(parser.parse_args(["--checkpoint", ckpt, "--mesh", "tensor=2",
                                               "--param-dtype", "bfloat16"]))
        kernel = loaded.params["layers_0"]["attn"]["q_proj"]["kernel"]
        out["bf16_kernel"] = str(kernel.dtype)
        out["loaded_mesh"] = dict(loaded.mesh.shape)
    return out


def test_sampling_on_8_devices_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "tensor" in result["q_spec"]
    assert result["tokens_equal"] and result["lengths_equal"]
    assert result["rewards_diff"] <= 1e-5
    assert result["score_critiques_equal"] and result["score_rewards_diff"] <= 1e-5
    for name in ("mesh_2x2x2", "mesh_default", "classic_tensor_4"):
        assert result[f"{name}_critiques_equal"], name
        assert result[f"{name}_rewards_diff"] <= 1e-5, (name, result)
    assert result["bf16_kernel"] == "bfloat16"
    assert result["loaded_mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}


if __name__ == "__main__":
    print(json.dumps(_compare_on_fake_devices()))
