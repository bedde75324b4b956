"""Model modules: encoder, connector, description projector, pixel/mask decoders and the full model."""
