"""What each training stage trains and what its final export records, in one place.

Every branch on ``train.stage`` reads a :class:`Stage` record instead of comparing names, so a
new stage (or a change to what one exports) is one entry in :data:`_RECORDS`.
"""

from __future__ import annotations

import dataclasses

from cloud_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    # The LM head's loss on the target tokens (critiques, or all text for lm_pretrain).
    lm_loss: bool
    # The reward head's Bradley-Terry loss on chosen vs rejected.
    bt_loss: bool
    # Rows must carry critiques (data.load_rows(require_feedback=...)).
    needs_feedback: bool
    # How the data layer lays out a sequence: "critique", "classic" or "lm".
    layout: str
    # Written to the exported config.json (see checkpoints.hf.save_cloud_reference): "teacher" for
    # a model that writes critiques, "vanilla" for a classic one (scored without critiques).
    feedback_method: str
    # The export records data.critique_prefix, which scoring needs to find where critiques start.
    exports_critique_prefix: bool
    # cloud weighs its LM term by loss.lm_coef against the BT term; LM-only stages take it as is.
    lm_coef_applies: bool = False


# In the order a run goes through them (the pipeline trains them in this order).
_RECORDS = (
    Stage("lm_pretrain", lm_loss=True, bt_loss=False, needs_feedback=True, layout="lm",
          feedback_method="teacher", exports_critique_prefix=False),
    Stage("critique_sft", lm_loss=True, bt_loss=False, needs_feedback=True, layout="critique",
          feedback_method="teacher", exports_critique_prefix=True),
    Stage("cloud", lm_loss=True, bt_loss=True, needs_feedback=True, layout="critique",
          feedback_method="teacher", exports_critique_prefix=True, lm_coef_applies=True),
    Stage("classic", lm_loss=False, bt_loss=True, needs_feedback=False, layout="classic",
          feedback_method="vanilla", exports_critique_prefix=False),
)
_BY_NAME = {s.name: s for s in _RECORDS}

STAGES = tuple(_BY_NAME)
LM_STAGES = tuple(s.name for s in _RECORDS if s.lm_loss)
BT_STAGES = tuple(s.name for s in _RECORDS if s.bt_loss)


def stage(name: str) -> Stage:
    """The record of stage ``name``; ConfigError naming the valid stages if there is none."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"train.stage={name!r}: expected one of {', '.join(STAGES)}") from None
