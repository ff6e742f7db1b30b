"""Audit of trained generators: fidelity, downstream utility, memorization and membership
inference, each judged against fresh real data (`fedsynth audit`; see pipeline.run_audit)."""
