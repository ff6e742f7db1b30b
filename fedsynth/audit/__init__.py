"""Audit of trained generators: fidelity, downstream utility, memorization and membership
inference, each against a real-data baseline (built in the audit issue; empty for now)."""
