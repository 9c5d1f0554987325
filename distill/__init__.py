"""Distillation: make the student that a variant's distilled-student swap serves."""
