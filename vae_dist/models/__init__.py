"""The models: one module per family behind one protocol, and the registry of names."""
