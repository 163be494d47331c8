"""The benchmark: protocols and the resumable grid, forgetting metrics, summary and report."""
