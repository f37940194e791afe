"""Standard terminology for segments: a bundle's codes -> Slicer's terminology entry string.

A bundle's ``terminology`` maps a label name to DICOM-style codes, each ``[scheme, value, meaning]``
(e.g. ``["SCT", "82471001", "Left atrium"]``), for ``category``, ``type`` and optionally
``type_modifier``, ``anatomic_region`` and ``anatomic_region_modifier``.

Slicer stores a segment's terminology in the segment tag ``TerminologyEntry`` as seven ``~``-separated
parts, each code written ``scheme^value^meaning`` (``^^`` when unused)::

    typeContext ~ category ~ type ~ typeModifier ~ regionContext ~ region ~ regionModifier

This layout is read by every Slicer version from 5.0 on (5.10 made the context names optional; they
are written here so older versions accept the entry too).
"""

from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["TYPE_CONTEXT", "REGION_CONTEXT", "entryString", "parseEntryString"]

TYPE_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"


def _code(value: Sequence[str] | None) -> str:
    if not value:
        return "^^"
    if len(value) != 3 or not all(isinstance(v, str) and v and "~" not in v and "^" not in v for v in value):
        raise ValueError(f"a terminology code must be [scheme, value, meaning] without '~' or '^', got {value!r}")
    return "^".join(value)


def entryString(codes: Mapping[str, Sequence[str]]) -> str:
    """The ``TerminologyEntry`` tag value for one label's codes (``category`` and ``type`` required)."""
    if not codes.get("category") or not codes.get("type"):
        raise ValueError("a terminology entry needs a category and a type code")
    region = codes.get("anatomic_region")
    return "~".join([
        TYPE_CONTEXT, _code(codes["category"]), _code(codes["type"]), _code(codes.get("type_modifier")),
        REGION_CONTEXT if region else "", _code(region), _code(codes.get("anatomic_region_modifier")),
    ])


def parseEntryString(text: str) -> dict[str, list[str]]:
    """The codes of an entry string (the inverse of :func:`entryString`; unused parts omitted)."""
    parts = text.split("~")
    if len(parts) != 7:
        raise ValueError(f"a terminology entry has 7 '~'-separated parts, got {len(parts)}")
    names = {1: "category", 2: "type", 3: "type_modifier", 5: "anatomic_region", 6: "anatomic_region_modifier"}
    out = {}
    for index, name in names.items():
        fields = parts[index].split("^")
        if len(fields) != 3:
            raise ValueError(f"terminology part {parts[index]!r} is not scheme^value^meaning")
        if any(fields):
            out[name] = fields
    return out
