"""The toy world: a 64x64 synthetic domain whose images a checker reads by pixels (SPEC.md)."""
