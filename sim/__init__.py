"""IB gateway simulator: TWS API server, simulated market and broker (see sim/README.md)."""
