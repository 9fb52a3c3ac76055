"""Sampling critiques with the KV cache and reading their rewards in the same loop."""

from cloud_jax.sampling.loop import (DECODE_PHASES, DecodeState, SampleOutput, bucket_length,
                                     check_decode_phases, check_steps_per_check, content_row_ids,
                                     decode, pad_prefixes, prefill, row_keys, sample,
                                     sample_padded)
from cloud_jax.sampling.methods import (Greedy, SamplingMethod, Temperature, TopK, TopP,
                                        check_repetition_penalty, check_seed, method_from,
                                        penalize_repeats)

__all__ = [
    "DECODE_PHASES", "DecodeState", "Greedy", "SampleOutput", "SamplingMethod", "Temperature",
    "TopK", "TopP",
    "bucket_length", "check_decode_phases", "check_repetition_penalty", "check_seed",
    "check_steps_per_check", "content_row_ids",
    "decode", "method_from",
    "pad_prefixes", "penalize_repeats", "prefill",
    "row_keys", "sample", "sample_padded",
]
