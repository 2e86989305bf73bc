"""Stage-2 networks: layers, then blocks, then models with named sizes."""
