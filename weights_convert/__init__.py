"""Checkpoint converters: other LLaVA layouts in, the minillava layout out (and back to llava-hf)."""
