"""A federated run's typed configuration (validated against the model families) and its run directory."""
