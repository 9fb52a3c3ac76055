"""Critique -> reward: sampled critiques with their rewards, classic rewards, and the stage-2
regeneration of a dataset's critiques.

    rewards.py   ScoreConfig, ScoreResult, score() (K critiques per input, or classic)
    relabel.py   regenerate every critique of preference rows with the SFT model (stage 2)
"""

from cloud_jax.scoring.rewards import ScoreConfig, ScoreResult, score

__all__ = ["ScoreConfig", "ScoreResult", "score"]
