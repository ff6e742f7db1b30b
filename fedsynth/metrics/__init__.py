"""Feature spaces, Fréchet distance and fidelity metrics, nearest neighbours: shared by validation scores
and the audit."""
