"""Stable Diffusion 1.x/2.x, LCM and SDXL pipelines."""
