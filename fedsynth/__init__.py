"""fedsynth: federated, privacy-audited generative models of CT/MRI slices."""

__version__ = "0.1.0"
