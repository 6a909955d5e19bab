"""Training: the PixArt-alpha DiT, the diffusion process and samplers, the shard loader, the DeepSpeed trainer."""
