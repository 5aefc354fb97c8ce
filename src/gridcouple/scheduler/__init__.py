"""Deciding when and where jobs run: policies, simulated time, traces, metrics, the journal."""

DEFAULT_TAU = 10.0  # seconds: the bounded slowdown's threshold (here: no numpy to import)
