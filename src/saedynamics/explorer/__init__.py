"""The static feature explorer: latents across checkpoints and seeds (`site.build_explorer`), from
the numbers computed in `latents`."""
