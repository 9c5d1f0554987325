"""Models below the serving layer: where checkpoints come from and the Llama forward pass."""
