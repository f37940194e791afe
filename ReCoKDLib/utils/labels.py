"""The label set: a segmentation's classes, named, valued, coloured and coded, owned here once.

A :class:`LabelSet` is what ``dataset.json``'s ``labels`` says (name -> integer value, background 0
included, nnU-Net's optional ``ignore``) plus how each class is shown: an RGB colour and, where known,
standard terminology codes. Datasets, plans, fingerprints, model bundles, metrics and the 3D Slicer
module all hold this one value, so class names, the class count and colours cannot drift apart.

It is a read-only ``Mapping[str, int]`` (so ``dict(label_set)``, ``label_set["tumour"]`` and ``==``
work as on the plain mapping; equality compares names and values only). Torch-free and numpy-free:
3D Slicer imports it before PyTorch is installed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Iterator

from ..errors import ReCoKDError

__all__ = ["LabelSet", "NAMED_COLORS", "DEFAULT_PALETTE", "IGNORE", "IGNORE_LABEL", "TEACHER_LABEL", "check_terminology"]

#: nnU-Net's name for the label whose voxels are left out of the loss; it is not a class
IGNORE = "ignore"
#: values a training target may hold besides classes (never in a label map on disk): voxels the segmentation
#: loss leaves out (a teacher label below the confidence threshold, unlabelled scans with soft targets only),
#: and voxels the step's own teacher forward labels (``--teacher-targets patch``)
IGNORE_LABEL = 255
TEACHER_LABEL = 254

#: Colours (RGB in 0..1) of class names ReCoKD knows: the built-in phantom's classes.
NAMED_COLORS: dict[str, tuple[float, float, float]] = {
    "background": (0.0, 0.0, 0.0),
    "organ": (0.69, 0.33, 0.26),  # brownish red, liver-like
    "kidney": (0.95, 0.60, 0.24),  # orange
    "vessel": (0.76, 0.16, 0.42),  # blue-ish red
    "lesion": (0.98, 0.86, 0.28),  # yellow
}

#: Colours for other labels, cycled in label-value order; background is always black.
DEFAULT_PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.89, 0.10, 0.11),
    (0.22, 0.49, 0.72),
    (0.30, 0.69, 0.29),
    (0.60, 0.31, 0.64),
    (1.00, 0.50, 0.00),
    (1.00, 1.00, 0.20),
    (0.65, 0.34, 0.16),
    (0.97, 0.51, 0.75),
    (0.40, 0.76, 0.65),
    (0.55, 0.63, 0.80),
)


def _as_label_value(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


#: the fields a label's terminology may carry (each [coding scheme, code value, code meaning]); the first two are required
TERMINOLOGY_FIELDS = ("category", "type", "type_modifier", "anatomic_region", "anatomic_region_modifier")
_TERMINOLOGY_FORMAT = '{"label name": {"category": [scheme, code, meaning], "type": [scheme, code, meaning]}}'


def check_terminology(terminology: Any, source: str) -> None:
    """Refuse, in one line naming ``source``, terminology that is not ``{label: {field: [scheme, code,
    meaning]}}`` with ``category`` and ``type`` (what bundles store and 3D Slicer shows); None passes."""
    if terminology is None:
        return
    if not isinstance(terminology, Mapping):
        raise ReCoKDError(f"{source}: terminology must be a JSON object {_TERMINOLOGY_FORMAT}, "
                          f"not a {type(terminology).__name__}")
    for name, codes in terminology.items():
        if not isinstance(codes, Mapping):
            raise ReCoKDError(f"{source}: terminology of {name!r} must be an object, e.g. {_TERMINOLOGY_FORMAT}")
        missing = [f for f in ("category", "type") if f not in codes]
        unknown = sorted(set(codes) - set(TERMINOLOGY_FIELDS))
        if missing or unknown:
            problem = f"lacks {', '.join(missing)}" if missing else f"has unknown field(s) {', '.join(unknown)}"
            raise ReCoKDError(f"{source}: terminology of {name!r} {problem}; give {_TERMINOLOGY_FORMAT} "
                              f"(fields: {', '.join(TERMINOLOGY_FIELDS)})")
        for field, code in codes.items():
            if not (isinstance(code, (list, tuple)) and len(code) == 3 and all(isinstance(c, str) and c for c in code)):
                raise ReCoKDError(f"{source}: terminology of {name!r}: {field} is {code!r}, not [coding scheme, "
                                  'code value, code meaning] (three non-empty strings), e.g. ["SCT", "10200004", "Liver"]')


class LabelSet(Mapping[str, int]):
    """Classes of a segmentation: name -> value (sorted by value), colours and terminology.

    Args:
        values: label name -> integer value >= 0; background (value 0) required, values unique.
        colors: name -> RGB in 0..1, for some or all names; the rest get :data:`NAMED_COLORS` or
            :data:`DEFAULT_PALETTE` (background black).
        terminology: name -> standard codes (``category``, ``type``, ... each ``[scheme, value, meaning]``),
            for the names that have them.
        source: how errors refer to where the labels came from (e.g. a ``dataset.json`` path).

    Raises:
        ReCoKDError: one line naming ``source`` and the fix (a value that is not an integer, negative or
            repeated, a repeated name, no background, a colour or terminology for an unknown name).
    """

    def __init__(self, values: Mapping[str, Any], colors: Mapping[str, Any] | None = None,
                 terminology: Mapping[str, Any] | None = None, source: str = "labels") -> None:
        if not isinstance(values, Mapping) or not values:
            raise ReCoKDError(f'{source}: "labels" must be a non-empty object, e.g. {{"background": 0, "tumour": 1}}')
        checked: dict[str, int] = {}
        for name, raw in values.items():
            value = _as_label_value(raw)
            if value is None:
                raise ReCoKDError(f"{source}: label {name!r} has value {raw!r}, not an integer; give each label one integer value")
            if value < 0:
                raise ReCoKDError(f"{source}: label {name!r} has negative value {value}; label values start at 0")
            checked[str(name)] = value
        numbers = list(checked.values())
        if len(set(numbers)) != len(numbers):
            dupes = sorted({v for v in numbers if numbers.count(v) > 1})
            raise ReCoKDError(f"{source}: label values {dupes} are used by more than one name; give each value one name")
        if 0 not in numbers:
            raise ReCoKDError(f'{source}: "labels" lacks the background value 0; add "background": 0')
        self._values = dict(sorted(checked.items(), key=lambda kv: kv[1]))
        self._colors = self._fill_colors(colors or {}, source)
        check_terminology(terminology, source)
        unknown = sorted(set(terminology or {}) - set(self._values))
        if unknown:
            raise ReCoKDError(f"{source}: terminology names label(s) {unknown} that the model does not have "
                              f"(labels: {', '.join(self._values)}); use the label names")
        self._terminology = {str(k): dict(v) for k, v in (terminology or {}).items()}

    @classmethod
    def parse(cls, raw: Any, source: str) -> "LabelSet":
        """A ``dataset.json`` ``labels`` object in either layout: name -> value (nnU-Net) or value -> name (MSD)."""
        if not isinstance(raw, dict) or not raw:
            raise ReCoKDError(
                f'{source}: "labels" must be a non-empty object, e.g. {{"background": 0, "tumour": 1}}; fix dataset.json'
            )
        if any(isinstance(v, (list, tuple)) for v in raw.values()):
            raise ReCoKDError(
                f"{source}: region-based labels (lists of values) are not supported; give each label one integer value"
            )
        keys_are_values = all(_as_label_value(k) is not None for k in raw) and all(
            isinstance(v, str) and _as_label_value(v) is None for v in raw.values()
        )
        values: dict[str, int] = {}
        for k, v in raw.items():
            name, value = (str(v), _as_label_value(k)) if keys_are_values else (str(k), _as_label_value(v))
            if value is None:
                raise ReCoKDError(
                    f'{source}: label {k!r}: {v!r} has no integer value; write labels as "name": value (nnU-Net) or "value": "name" (MSD)'
                )
            if name in values:
                raise ReCoKDError(f"{source}: label name {name!r} appears twice; give every label its own name")
            values[name] = value
        return cls(values, source=source)

    def _fill_colors(self, given: Mapping[str, Any], source: str) -> dict[str, tuple[float, float, float]]:
        unknown = sorted(set(given) - set(self._values))
        if unknown:
            raise ReCoKDError(f"{source}: colours for label(s) {unknown} that do not exist; use the label names")
        phantom_like = set(self._values) <= set(NAMED_COLORS)
        colors: dict[str, tuple[float, float, float]] = {}
        cycle = 0
        for name, value in self._values.items():
            if name in given:
                rgb = tuple(float(c) for c in given[name])[:3]
            elif phantom_like:
                rgb = NAMED_COLORS[name]
            elif value == 0:
                rgb = (0.0, 0.0, 0.0)
            else:
                rgb = DEFAULT_PALETTE[cycle % len(DEFAULT_PALETTE)]
            if value != 0 and name not in given and not phantom_like:
                cycle += 1
            if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
                raise ReCoKDError(f"{source}: colour of label {name!r} must be 3 numbers in 0..1, got {list(rgb)}")
            colors[name] = rgb  # type: ignore[assignment]
        return colors

    # -- the mapping -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"LabelSet({self._values})"

    # -- what the classes are ----------------------------------------------------------------------
    @property
    def colors(self) -> dict[str, tuple[float, float, float]]:
        """Name -> RGB in 0..1, for every label."""
        return dict(self._colors)

    @property
    def terminology(self) -> dict[str, dict[str, Any]]:
        """Name -> standard codes, for the labels that have them."""
        return {k: dict(v) for k, v in self._terminology.items()}

    @property
    def ignore_label(self) -> int | None:
        """The value of nnU-Net's ``ignore`` label, or ``None``."""
        return self._values.get(IGNORE)

    @property
    def num_classes(self) -> int:
        """Output classes: the largest class value + 1 (``ignore`` is not a class)."""
        return max(v for k, v in self._values.items() if k != IGNORE) + 1

    @property
    def names(self) -> list[str]:
        """Class names indexed by value, background first; a value without a name is ``label_<v>``."""
        by_value = {v: k for k, v in self._values.items() if k != IGNORE}
        return [by_value.get(v, f"label_{v}") for v in range(self.num_classes)]

    @property
    def foreground_names(self) -> list[str]:
        """:attr:`names` without the background."""
        return self.names[1:]

    def foreground(self) -> list[tuple[str, int]]:
        """(name, value) of every named class but background and ``ignore``, by value."""
        return [(k, v) for k, v in self._values.items() if v != 0 and k != IGNORE]

    # -- serialisation -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, int]:
        """Name -> value, as ``dataset.json``, plans and bundles store it."""
        return dict(self._values)

    def display_json(self) -> dict[str, Any]:
        """A bundle manifest's ``labels``, ``colors`` and (when any) ``terminology``."""
        out: dict[str, Any] = {"labels": self.to_json(), "colors": {k: list(v) for k, v in self._colors.items()}}
        if self._terminology:
            out["terminology"] = self.terminology
        return out

    def with_display(self, colors: Mapping[str, Any] | None = None,
                     terminology: Mapping[str, Any] | None = None) -> "LabelSet":
        """The same classes with other colours and/or terminology (``None`` keeps this set's)."""
        return LabelSet(self._values, self._colors if colors is None else colors,
                        self._terminology if terminology is None else terminology)
