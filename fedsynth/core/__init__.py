"""What every stage uses and that knows nothing of GANs: errors, atomic files and the one JSON writer,
checkpoints, weights, device, seeds, grids, plotting, progress, intervals."""
