"""Model roles (interfaces), the backends behind them, and their weight resolution."""
