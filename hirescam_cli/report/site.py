"""What both pages share: the Jinja environment, number formats, method names, script data, atomic writes."""

import decimal
import json
import math
import os
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

STATIC = Path(__file__).parent / "static"
METHOD_NAMES = {
    "hirescam": "HiResCAM",
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "gradcam-elementwise": "Grad-CAM (element-wise)",
}


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def _js_format(value: float, spec: str) -> str:
    """Format the float's exact value rounding ties away from zero, as JavaScript's toFixed does."""
    with decimal.localcontext(rounding=decimal.ROUND_HALF_UP):
        return format(decimal.Decimal(value + 0.0), spec)  # + 0.0: no sign on a negative zero


def fixed(value: float | None, digits: int) -> str:
    """A number with `digits` decimals (JavaScript's toFixed), or an en dash when there is none."""
    return "\N{EN DASH}" if value is None or not math.isfinite(value) else _js_format(value, f".{digits}f")


def exponent(value: float | None) -> str:
    """A number as 1.2e-6 (JavaScript's toExponential(1)), or an en dash when there is none."""
    if value is None or not math.isfinite(value):
        return "\N{EN DASH}"
    if value == 0:
        return "0.0e+0"
    mantissa, power = _js_format(value, ".1e").split("e")
    return f"{mantissa}e{int(power):+d}"


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("hirescam_cli.report", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(fixed=fixed, exponent=exponent, method_name=method_name)
    return env


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temp file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def js_string(text: str) -> str:
    """A JavaScript string literal of `text` that is safe in a script file or tag (no <, >, & or line
    separators appear as themselves). `JSON.parse` of it is how the pages load large data: V8 parses
    that several times faster than the same object literal."""
    literal = json.dumps(text, ensure_ascii=False)
    for char in "<>&\u2028\u2029":
        literal = literal.replace(char, f"\\u{ord(char):04x}")
    return literal
