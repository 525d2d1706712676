"""Measurements on trained SAEs: reconstruction and sparsity, seed consistency, superposition.

Each is a plain function (docs/spec/measurements.md) that knows only `encode`/`decode` and the weight
matrices, so it can be reused on any SAE with SAELens-shaped W_enc [d_in, d_sae], W_dec [d_sae, d_in].
"""
