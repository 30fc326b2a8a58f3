"""The engine: the math of explaining one batch, knowing nothing of files.

explainer.py (the Explainer and its Explanation) composes capture.py (the hook, the forward to a
leaf, the batched gradient), head.py (is the head affine?), methods.py (the CAM methods over flat
positions), occlusion.py and diagnostics.py; layers.py traces and chooses target layers and
layouts.py reads any layer's output as (B, K, N). Importing this package loads no torch until the
Explainer is asked for, so the config can read the method names quickly.
"""

__all__ = ["Explainer", "Explanation"]


def __getattr__(name: str):
    if name in __all__:
        from . import explainer

        return getattr(explainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
