"""One input's outputs in two versions, for tests of the swap (light: child processes import it)."""

import numpy as np


def image_set(version: int, classes: list[int], methods: list[str], raw: bool, key: str = "k"):
    """A summary and its pictures for write_image, every pixel and raw value equal to `version`."""

    def maps(cls: int) -> dict:
        raw_path = lambda m: f"{key}/{m}-{cls}.npy" if raw else None  # noqa: E731
        return {m: {"png": f"{key}/{m}-{cls}.png", "raw": raw_path(m)} for m in methods}

    summary = {"version": version, "width": 5, "height": 3, "targets": [{"maps": maps(c)} for c in classes]}
    targets = range(len(classes))
    pictures = {m: {t: np.full((3, 5, 3), version, np.uint8) for t in targets} for m in methods}
    raw_maps = (
        {m: {t: np.full((2, 2), version, np.float32) for t in targets} for m in methods} if raw else None
    )
    return summary, pictures, raw_maps


OLD = (1, [0, 1], ["hirescam", "gradcam"], True)
NEW = (2, [2], ["gradcam"], False)
