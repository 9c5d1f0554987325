"""Engines turn token ids into streams of generated text."""
