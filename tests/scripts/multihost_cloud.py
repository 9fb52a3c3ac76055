"""Worker of tests/test_multihost.py: `cloud` training with orbax checkpoints, then (optionally)
restore and critique sampling, on one global mesh of 8 CPU devices whether they sit in one process
or in several (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID and XLA_FLAGS come from
the caller).

    python multihost_cloud.py ARGS_JSON

ARGS_JSON: {"config": path, "overrides": [...]} trains with cloud_jax.training.loop.run (resuming
from the output_dir's checkpoints, if any); with "sample_out": path, "steps": [...], "prompts" and
"responses" it then restores the checkpoints of those steps and scores the (prompt, response)
pairs with the last one. Process 0 writes sample_out (.npz): the restored params of every step
(whole arrays, gathered from all processes), the rewards and the critiques.
"""

import json
import os
import sys

from cloud_jax.sharding import init_distributed

# As `python -m cloud_jax.train` does, before anything touches a device: with
# JAX_COORDINATOR_ADDRESS set, jax.distributed.initialize() from the JAX_* variables.
init_distributed("auto")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from cloud_jax.api import RewardModel  # noqa: E402
from cloud_jax.training.config import load_config  # noqa: E402
from cloud_jax.data.tokenizer import load_tokenizer  # noqa: E402
from cloud_jax.scoring.rewards import ScoreConfig, score  # noqa: E402
from cloud_jax.sharding import TRAIN_RULES, make_mesh  # noqa: E402
from cloud_jax.training.checkpointing import Checkpointer  # noqa: E402
from cloud_jax.training.loop import run  # noqa: E402
from cloud_jax.training.step import StepBuilder  # noqa: E402

assert jax.device_count() == 8, jax.devices()
args = json.loads(sys.argv[1])
cfg = load_config(args["config"], args["overrides"])
summary = run(cfg)
print(json.dumps({"process": jax.process_index(), "step": summary["step"]}), flush=True)
if "sample_out" not in args:
    sys.exit(0)

mesh = make_mesh(cfg.mesh)
builder = StepBuilder(cfg, mesh, TRAIN_RULES, cfg.model)
ckpt = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), cfg.train.keep_checkpoints,
                    async_save=False)
out = {}
for step in args["steps"]:
    state = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(builder.abstract_state())))["state"]
    whole = multihost_utils.process_allgather(state["params"], tiled=True)
    for path, leaf in jax.tree_util.tree_flatten_with_path(whole)[0]:
        out[f"params{step}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
ckpt.close()

# The last restored params, still in their training layout: scoring re-lays them out with the
# sampling rules (weights off fsdp) and spreads the prefixes over data x fsdp of the global mesh.
rm = RewardModel(cfg.model, state["params"], load_tokenizer(cfg.data.tokenizer), mesh,
                 TRAIN_RULES)
result = score(rm, args["prompts"], args["responses"], ScoreConfig(
    num_samples=4, temperature=1.0, max_critique_tokens=12, seed=3, batch_size=4,
    max_length=cfg.data.max_length, critique_prefix=cfg.data.critique_prefix))
out.update(rewards=result.rewards, sample_rewards=result.sample_rewards,
           critique_tokens=result.critique_tokens,
           critiques=np.asarray(result.critiques, dtype=str))
if jax.process_index() == 0:
    np.savez(args["sample_out"], **out)
print(json.dumps({"process": jax.process_index(), "rewards": result.rewards.tolist()}),
      flush=True)
