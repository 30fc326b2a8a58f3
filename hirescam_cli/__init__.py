"""hirescam-cli: faithful HiResCAM and Grad-CAM explanations for PyTorch image classifiers."""

__all__ = ["METHODS", "Explainer", "Explanation", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import the engine on first use, so light modules (the output writers) start without torch."""
    if name in ("Explainer", "Explanation"):
        from . import engine

        return getattr(engine, name)
    if name == "METHODS":
        from .engine.methods import METHODS

        return METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
