"""Routing queries to domain adapters: features, the router, its evaluation."""
