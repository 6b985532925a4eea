"""calc: a tiny calculator package (the example project of examples/refactor.toml)."""
