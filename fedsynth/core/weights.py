"""Which model tensors travel and are checkpointed, under which prefixed names."""

from __future__ import annotations

import torch

__all__ = [
    "AVERAGE",
    "DISCRIMINATOR",
    "GENERATOR",
    "exchanged_state",
    "model_tensors",
    "sampling_state",
    "split_model",
]

GENERATOR, DISCRIMINATOR = "generator", "discriminator"
# The server's running average of the global generator over rounds (federation.generator-average):
# kept in the round's checkpoint beside the generator and never trained on (hospitals receive it
# only to score it, in validation messages); sampling uses it.
AVERAGE = "generator-average"
_SKIP_SUFFIX = "num_batches_tracked"  # an integer step counter, meaningless to average


def exchanged_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights and buffers that travel: everything but BatchNorm's step counters."""
    return {k: v for k, v in module.state_dict().items() if not k.endswith(_SKIP_SUFFIX)}


def model_tensors(
    gen: torch.nn.Module, disc: torch.nn.Module | None = None, average: torch.nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """One flat dict of prefixed tensors: the generator, and the discriminator and the
    generator's running average if given."""
    out = {f"{GENERATOR}.{k}": v.detach().cpu() for k, v in exchanged_state(gen).items()}
    if disc is not None:
        out.update({f"{DISCRIMINATOR}.{k}": v.detach().cpu() for k, v in exchanged_state(disc).items()})
    if average is not None:
        out.update({f"{AVERAGE}.{k}": v.detach().cpu() for k, v in exchanged_state(average).items()})
    return out


def split_model(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Prefixed tensors (``generator.x``, ``discriminator.y``) to two state dicts. The
    generator's running average (``generator-average.z``), in a checkpoint, is left out:
    training goes on from the generator itself; :func:`sampling_state` reads the average.

    Raises
    ------
    KeyError
        A key with neither prefix.
    """
    gen, disc = {}, {}
    for key, value in tensors.items():
        prefix, _, name = key.partition(".")
        if prefix == GENERATOR:
            gen[name] = value
        elif prefix == DISCRIMINATOR:
            disc[name] = value
        elif prefix != AVERAGE:
            raise KeyError(f"unexpected model key {key!r}")
    return gen, disc


def sampling_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The generator weights to draw images from: the running average where the
    checkpoint holds one, else the generator itself."""
    average = {k.partition(".")[2]: v for k, v in tensors.items() if k.partition(".")[0] == AVERAGE}
    return average or split_model(tensors)[0]


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load exchanged weights (no step counters) into a module; other keys must match."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(_SKIP_SUFFIX)]
    if missing or unexpected:
        raise KeyError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
