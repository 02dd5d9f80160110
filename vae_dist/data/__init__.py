"""The data: the dataset table and its bounded IDX reader, the in-memory loaders, and keyed randomness."""
