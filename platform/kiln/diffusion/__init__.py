"""The text-to-image base of kiln: tiny Stable-Diffusion components and the world's instrument."""
