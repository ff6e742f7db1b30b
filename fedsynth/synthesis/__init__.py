"""Drawing from a run's generator: the one loader, samples written as files, translations."""
