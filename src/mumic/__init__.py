"""MuMIC: multi-label image classification with image-text embeddings and a tempered sigmoid."""

__version__ = "0.1.0"

from mumic.errors import MumicError  # noqa: E402

__all__ = ["MumicError", "MuMIC", "Predictor", "fit", "__version__"]


def __getattr__(name: str):
    # Lazy: importing mumic must stay cheap (the CLI's --help should not load torch).
    if name == "MuMIC":
        from mumic.model import MuMIC

        return MuMIC
    if name == "Predictor":
        from mumic.predictor import Predictor

        return Predictor
    if name == "fit":
        from mumic.train import fit

        return fit
    raise AttributeError(name)
