"""The stages, one module each, named as `stages=[...]` names them; each has `inputs(ctx)` and `run(ctx)`.
Stages never import each other: what two stages share lives in data/, train/, checkpoint/, hf/ or observe/."""
