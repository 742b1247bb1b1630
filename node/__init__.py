"""A Hapax gateway node: front doors, process lifecycle and CLI."""
