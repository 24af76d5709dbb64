"""Data: sources, folds, episodic sampling with grain, transforms."""
