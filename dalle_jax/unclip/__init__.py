"""unCLIP (DALL-E 2): the diffusion decoder and upsamplers conditioned on CLIP latents."""
