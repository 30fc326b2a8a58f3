"""hirescam-cli: faithful HiResCAM and Grad-CAM explanations for PyTorch image classifiers."""

from .engine import Explainer, Explanation
from .methods import METHODS

__all__ = ["METHODS", "Explainer", "Explanation", "__version__"]
__version__ = "0.1.0"
