"""Published numbers, the grids that reproduce them, and published / ours / delta tables."""
