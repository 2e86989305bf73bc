"""Training objectives: each wraps a plain network and turns a batch into a loss (the network never sees noise)."""
