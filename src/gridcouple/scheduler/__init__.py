"""Deciding when and where jobs run: policies, simulated time, traces, metrics, the journal."""
