"""One module per stage; each exposes `run(cfg) -> dict` of metrics."""
