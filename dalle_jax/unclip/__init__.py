"""DALL-E 2 (unCLIP, Ramesh et al. 2022): the diffusion core, the prior, the decoder and the upsamplers."""
