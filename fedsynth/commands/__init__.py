"""The `fedsynth` sub-commands, one module each; `fedsynth.cli` registers them."""
