"""The cases to benchmark: what a :class:`Case` is, which ones run by default and with
``--quick``, and how ``--shapes`` names them (:func:`parse_case`, :func:`select_cases`).

Also the operations (:data:`OPS`) and dtypes a case can be run in.
"""

import math
import re
from dataclasses import dataclass, replace

OPS = ("train", "backward", "eval")
OP_TITLES = {"train": "train forward", "backward": "backward", "eval": "eval forward"}
DTYPES = ("float32", "float64")

#: Cases at least this large (in elements) are also timed with 1 thread against more.
LARGE_NUMEL = 1 << 20


@dataclass(frozen=True)
class Case:
    """One input to benchmark: a shape, a dtype and where its channel axis is."""

    shape: tuple
    dtype: str = "float32"
    channels_last: bool = False

    @property
    def axis(self):
        return -1 if self.channels_last else 1

    @property
    def channels(self):
        return self.shape[self.axis]

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def single(self):
        """One value per channel: only eval mode is defined."""
        return self.numel == self.channels

    @property
    def ops(self):
        return ("eval",) if self.single else OPS

    @property
    def layout(self):
        if len(self.shape) == 2:
            return "NC"
        if self.channels_last:
            return "NHWC" if len(self.shape) == 4 else "channels-last"
        return "NCHW" if len(self.shape) == 4 else "channels-first"

    @property
    def name(self):
        """The spelling ``--shapes`` accepts: ``32x56x56x64-nhwc``, ``256x1024-f64``."""
        name = "x".join(map(str, self.shape))
        if self.channels_last and len(self.shape) > 2:
            name += "-nhwc" if len(self.shape) == 4 else "-last"
        if self.dtype != "float32":
            name += "-f64"
        return name


DEFAULT_CASES = (
    Case((1, 512)),
    Case((256, 1024)),
    Case((4096, 256)),
    Case((131072, 8)),  # narrow rows: a few features per example, as in tabular data
    Case((16, 16384)),  # wide rows: few examples of many features
    Case((8, 256, 14, 14)),
    Case((64, 512, 7, 7)),  # short runs: ResNet's last stage
    Case((32, 64, 56, 56)),
    Case((32, 56, 56, 64), channels_last=True),
    Case((16, 64, 56, 56), "float64"),
    Case((256, 1024), "float64"),
)

#: ``--quick``: the same kinds of case, small enough for a smoke test.
QUICK_CASES = (
    Case((1, 512)),
    Case((64, 256)),
    Case((4, 32, 14, 14)),
    Case((4, 14, 14, 32), channels_last=True),
    Case((64, 256), "float64"),
)

_ALIASES = {
    "single": ("1x512",),
    "nc": ("256x1024", "4096x256", "131072x8", "16x16384"),
    "nchw": ("32x64x56x56",),
    "nhwc": ("32x56x56x64-nhwc",),
    "f64": ("16x64x56x56-f64", "256x1024-f64"),
    "large": tuple(case.name for case in DEFAULT_CASES if case.numel >= LARGE_NUMEL),
    "all": tuple(case.name for case in DEFAULT_CASES),
    "default": tuple(case.name for case in DEFAULT_CASES),
}

_TAGS = {
    "nhwc": ("channels_last", True),
    "last": ("channels_last", True),
    "cl": ("channels_last", True),
    "f32": ("dtype", "float32"),
    "float32": ("dtype", "float32"),
    "f64": ("dtype", "float64"),
    "float64": ("dtype", "float64"),
}


def parse_case(spec):
    """A :class:`Case` from ``32x64x56x56``, ``32x56x56x64-nhwc``, ``256x1024-f64``."""
    shape_text, *tags = spec.strip().lower().split("-")
    if not re.fullmatch(r"\d+(x\d+)+", shape_text):
        raise ValueError(
            f"bad shape {spec!r}: expected a case name ({', '.join(sorted(_ALIASES))}) "
            "or sizes joined by 'x' with at least 2 dimensions, e.g. 32x64x56x56, "
            "optionally followed by -nhwc (channels last) and/or -f64"
        )
    fields = {"shape": tuple(int(size) for size in shape_text.split("x"))}
    for tag in tags:
        if tag not in _TAGS:
            raise ValueError(f"bad tag {tag!r} in {spec!r}: expected one of {', '.join(_TAGS)}")
        key, value = _TAGS[tag]
        fields[key] = value
    if 0 in fields["shape"]:
        raise ValueError(f"bad shape {spec!r}: sizes must be positive")
    return Case(**fields)


def select_cases(shapes=None, dtypes=None, quick=False):
    """The cases to run: ``shapes`` (names, aliases or shapes) with ``dtypes`` forced if given."""
    if shapes is None:
        cases = list(QUICK_CASES if quick else DEFAULT_CASES)
    else:
        cases = []
        for spec in shapes:
            names = _ALIASES.get(spec.strip().lower(), (spec,))
            cases.extend(parse_case(name) for name in names)
    if dtypes:
        cases = [replace(case, dtype=dtype) for dtype in dtypes for case in cases]
    return list(dict.fromkeys(cases))  # in order, without duplicates
