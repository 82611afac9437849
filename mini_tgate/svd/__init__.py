"""Stable Video Diffusion: the spatio-temporal UNet, the temporal VAE, CLIP vision, the SVD pipeline."""
