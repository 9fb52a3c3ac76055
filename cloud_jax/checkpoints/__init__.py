"""Checkpoint formats: orbax train state, Hugging Face safetensors in/out, GGUF conversion."""
