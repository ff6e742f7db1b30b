"""Flower, and only here (with the two apps): launching simulations and deployments, the strategy, records."""
