"""Pure-PyTorch references of every op (dense, exact, float64-capable): the test oracles."""
