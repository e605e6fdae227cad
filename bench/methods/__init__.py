"""Method plugins: one file per method family, each a small estimator (fit, then predict)."""
