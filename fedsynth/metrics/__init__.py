"""Feature spaces, Fréchet distance and fidelity metrics, nearest neighbours, and the copy
detector (nearest images once a disguise is undone): shared by validation scores, ingestion's
de-duplication and the audit."""
