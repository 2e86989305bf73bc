"""Stage-1 tokenizers: the space the generator works in (pixels, VAE latents, RAE representations)."""
