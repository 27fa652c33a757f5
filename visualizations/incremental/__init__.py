"""Exact incremental inference for occlusion: recompute only what a hidden window changes."""
