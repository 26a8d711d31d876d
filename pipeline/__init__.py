"""From raw text to a verified HF-loadable base and chat model, with one Hydra config."""
__version__ = "0.1.0"
