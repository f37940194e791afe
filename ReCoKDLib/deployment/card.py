"""A model card: what a bundle expects as input, how it was trained, how accurate it is and on what, and
its terms, in words a clinician can check before using it (issue 28).

Most of it is derived from what every bundle already holds (the plan and its dataset fingerprint, the
training settings in the provenance, the recorded test metrics); what only a person can say (intended
use, known limitations, cross-validated figures, "cropped around X") comes from the optional ``card``
entry of the manifest, written by ``recokd export --card CARD.json``.
"""

from __future__ import annotations

from typing import Any

from ..data.augmentation import trained_mirror_axes
from ..errors import ReCoKDError

__all__ = ["CARD_FIELDS", "DEFAULT_INTENDED_USE", "check_card", "model_card", "card_rows", "format_card", "format_rows"]

#: what ``--card`` may state (each a string): shown as given, above the derived facts
CARD_FIELDS = ("intended_use", "modality", "field_of_view", "intensities", "training_data", "accuracy",
               "limitations")
#: the intended use of a card that does not state one
DEFAULT_INTENDED_USE = "research only, not for clinical use"



def trained_without_spacing(fingerprint: dict[str, Any]) -> bool:
    """Whether every training case said 1 x 1 x 1 (voxel units: the images had no physical spacing), from a
    plan's fingerprint summary: such a model expects images at its training resolution, spacing 1 x 1 x 1."""
    low, high = fingerprint.get("min_spacing"), fingerprint.get("max_spacing")
    return bool(low and high) and all(abs(float(v) - 1.0) < 1e-6 for v in (*low, *high))

def check_card(card: Any, source: str) -> dict[str, str]:
    """``card`` as written into a manifest, or one line naming ``source`` and the allowed fields."""
    if not isinstance(card, dict):
        raise ReCoKDError(f"{source}: a model card is a JSON object with some of {', '.join(CARD_FIELDS)}")
    unknown = sorted(set(card) - set(CARD_FIELDS))
    if unknown:
        raise ReCoKDError(f"{source}: unknown model card field(s) {', '.join(unknown)}; use {', '.join(CARD_FIELDS)}")
    bad = [k for k, v in card.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ReCoKDError(f"{source}: model card field {bad[0]} must be a non-empty string")
    return {k: card[k].strip() for k in CARD_FIELDS if k in card}


def _mm(values: Any) -> str:
    return " x ".join(f"{float(v):.3g}" for v in values)


def model_card(bundle: Any) -> list[tuple[str, str]]:
    """The card of ``bundle`` (a :class:`~ReCoKDLib.deployment.bundle.Bundle`) as (heading, text) rows: the
    author's statements first, then what the bundle's plan, fingerprint and provenance show."""
    return card_rows(bundle.manifest, bundle.plans.to_dict(), bundle.mirror_axes)


def card_rows(manifest: dict[str, Any], plans: dict[str, Any], mirror_axes: Any = "derive") -> list[tuple[str, str]]:
    """:func:`model_card` from a bundle's ``bundle.json`` and ``plans.json`` as plain dicts, without PyTorch
    (what the 3D Slicer module shows before the network's libraries are installed).

    Args:
        mirror_axes: the axes the network saw mirrored in training (``None``: unknown); by default taken
            from the manifest, else derived from the training augmentation in its provenance.
    """
    stated = dict(manifest.get("card") or {})
    fp = plans.get("fingerprint") or {}
    prov = dict(manifest.get("provenance") or {})
    config = prov.get("config") or {}
    if mirror_axes == "derive":
        mirror_axes = (tuple(int(a) for a in manifest["mirror_axes"]) if "mirror_axes" in manifest
                       else trained_mirror_axes(config.get("augment"), config.get("patch_size")))
    target = [float(t) for t in plans.get("target_spacing") or (1.0, 1.0, 1.0)]
    median = [float(m) for m in plans.get("median_shape") or (0, 0, 0)]
    name, role = manifest.get("name", "model"), manifest.get("role", "model")
    rows: list[tuple[str, str]] = [("model", f"{name} ({role}): {manifest.get('description', '')}".rstrip(": "))]
    rows.append(("intended use", stated.get("intended_use", DEFAULT_INTENDED_USE)))
    names = {int(k): str(v) for k, v in (manifest.get("channel_names") or plans.get("channel_names") or {"0": "image"}).items()}
    channels = ", ".join(f"{i}: {n}" for i, n in sorted(names.items()))
    rows.append(("input", stated.get("modality", f"{len(names)} channel(s) ({channels})")))
    low, high = fp.get("min_spacing"), fp.get("max_spacing")
    if trained_without_spacing(fp):
        spacing = ("1 x 1 x 1 in every training case: the training images had no physical spacing (voxel units); "
                   "give images with spacing 1 x 1 x 1 at the training resolution")
    elif low and high:
        spacing = f"trained at {_mm(target)} mm (D x H x W); training cases {_mm(low)} to {_mm(high)} mm"
    else:
        spacing = f"trained at {_mm(target)} mm (D x H x W)"
    rows.append(("spacing", spacing))
    small, large = fp.get("min_shape_after_crop"), fp.get("max_shape_after_crop")
    unit = "voxels" if spacing.startswith("1 x 1 x 1 in every") else "mm"
    view = f"median training case {_mm(v * s for v, s in zip(median, target))} {unit}"
    if small and large:
        view += (f" ({_mm(v * s for v, s in zip(small, target))} to "
                 f"{_mm(v * s for v, s in zip(large, target))} {unit})")
    rows.append(("field of view", stated.get("field_of_view", view) + ("" if "field_of_view" not in stated else f"; {view}")))
    schemes = ", ".join(f"{n['scheme']}" + (f" (clipped to {float(n['lower']):g}..{float(n['upper']):g})"
                                             if n["scheme"] == "ct" else " (per image)")
                        for n in plans.get("normalisation") or [])
    rows.append(("intensities", stated.get("intensities", f"normalised: {schemes}")))
    cases = fp.get("num_cases")
    iterations = (config.get("epochs") or 0) * (config.get("iters_per_epoch") or 0)
    trained = [f"dataset {prov.get('dataset_name') or plans.get('dataset_name', 'not recorded')}" + (f", {cases} cases" if cases else "")]
    if prov.get("method"):
        trained.append(f"distilled with {prov['method']} (width factor {prov.get('width_factor')})")
    if iterations:
        trained.append(f"{iterations} iterations")
    mirrored = mirror_axes
    trained.append("augmentation " + str(config.get("augment", "not recorded")) +
                   ("" if mirrored is None else f"; mirrored along {list(mirrored)}" if mirrored else "; never mirrored"))
    rows.append(("training", stated.get("training_data", "; ".join(trained))))
    accuracy = []
    if "accuracy" in stated:
        accuracy.append(stated["accuracy"])
    test = prov.get("test_metrics") or {}
    if test.get("dice_mean") is not None:
        accuracy.append(f"mean Dice {float(test['dice_mean']):.3f} on {test.get('num_cases', '?')} held-out case(s) "
                        f"({test.get('command', 'recokd evaluate')})")
    best = (prov.get("metrics") or {}).get("best_dice_mean")
    if best is not None:
        accuracy.append(f"validation Dice during training {float(best):.3f} (one fold's validation cases, "
                        "model selection: not an estimate of accuracy)")
    if not accuracy:
        accuracy.append("not measured on held-out cases")
    if "accuracy" not in stated:
        accuracy.append("no cross-validated figure recorded")
    rows.append(("accuracy", "; ".join(accuracy)))
    if "limitations" in stated:
        rows.append(("limitations", stated["limitations"]))
    rows.append(("test-time augmentation", "not available (trained without mirroring)" if mirrored == () else
                 "along the trained axes" if mirrored else "axes not recorded"))
    rows.append(("post-processing", str(manifest.get("postprocessing", "none"))))
    rows.append(("licence", str(prov.get("license") or "not stated")))
    return rows


def format_card(bundle: Any) -> str:
    """The card as aligned text lines (``recokd models NAME``, ``recokd predict --info``)."""
    return format_rows(model_card(bundle))


def format_rows(rows: list[tuple[str, str]]) -> str:
    """(heading, text) rows as aligned text lines."""
    width = max(len(h) for h, _ in rows)
    return "\n".join(f"{h:<{width}}  {t}" for h, t in rows)
