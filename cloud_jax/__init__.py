"""cloud_jax: Critique-out-Loud reward models in JAX/Flax.

    import cloud_jax
    rm = cloud_jax.load("path/to/model")
    logits, rewards = rm.forward(input_ids, attention_mask)
"""

import logging as _logging


class _NoTorchNotice(_logging.Filter):
    """transformers announces on import, where PyTorch is not installed, that "Models won't be
    available": true of its PyTorch models, none of which cloud_jax uses (it reads tokenizers,
    configs and GGUF files through transformers). `make demo` installs no PyTorch (only `make
    test` does, as the tests' reference), so every command's first line was that notice, which
    reads as if something were missing. Only that one message is dropped."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found.")


_logging.getLogger("transformers").addFilter(_NoTorchNotice())

from cloud_jax.api import RewardModel, from_config, load  # noqa: E402

__all__ = ["RewardModel", "from_config", "load"]
__version__ = "0.1.0"
