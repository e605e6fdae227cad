"""bench check: the regression gate comparing a run with a committed baseline."""
