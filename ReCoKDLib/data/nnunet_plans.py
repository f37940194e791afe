"""ReCoKD plans from an nnU-Net v2 model's ``plans.json``, so data are preprocessed as the teacher's were."""

from __future__ import annotations

from ..errors import ReCoKDError
from ..models.nnunet import NNUNetModel
from .planning import ChannelNormalisation, Plans

__all__ = ["plans_from_nnunet"]

_NORMALISATION = {"ZScoreNormalization": "zscore", "CTNormalization": "ct"}


def plans_from_nnunet(model: NNUNetModel) -> Plans:
    """The nnU-Net model's preprocessing as ReCoKD :class:`~ReCoKDLib.data.planning.Plans`: its configuration's
    spacing, patch (both in the image array's axis order) and batch, per-channel normalisation (Z-score; CT with the foreground intensity
    properties of ``plans.json``) and image resampling order; labels and channels from its ``dataset.json``.

    Raises:
        ReCoKDError: a damaged transpose, a normalisation ReCoKD does not implement, or plans and dataset.json
            that do not belong together (one line, naming the file).
    """
    to_image = model.to_image_axes  # plans list per-axis values in the network's (transposed) axis order
    conf = model.config()
    where = f"{model.folder / 'plans.json'} ({model.configuration})"
    schemes = list(conf.get("normalization_schemes") or [])
    masks = list(conf.get("use_mask_for_norm") or [False] * len(schemes))
    props = model.plans_json.get("foreground_intensity_properties_per_channel") or {}
    channels = model.channel_names
    if len(schemes) != len(channels):
        raise ReCoKDError(f"{where}: {len(schemes)} normalisation scheme(s) for {len(channels)} channel(s) of "
                          "dataset.json; the folder's plans and dataset.json do not belong together")
    norms = []
    for c, (scheme, masked) in enumerate(zip(schemes, masks)):
        ours = _NORMALISATION.get(scheme)
        if ours is None:
            raise ReCoKDError(f"{where}: channel {c} uses {scheme}, which ReCoKD does not implement "
                              f"(supported: {', '.join(_NORMALISATION)})")
        if ours == "zscore" and masked:
            raise ReCoKDError(f"{where}: channel {c} is Z-scored inside the non-zero mask (use_mask_for_norm), "
                              "which ReCoKD does not implement yet")
        if ours == "ct":
            p = props.get(str(c)) or {}
            try:
                norms.append(ChannelNormalisation("ct", mean=float(p["mean"]), std=float(p["std"]),
                                                  lower=float(p["percentile_00_5"]), upper=float(p["percentile_99_5"])))
            except (KeyError, TypeError, ValueError):
                raise ReCoKDError(f"{where}: channel {c} is CT-normalised but foreground_intensity_properties_"
                                  f"per_channel['{c}'] lacks mean/std/percentile_00_5/percentile_99_5") from None
        else:
            norms.append(ChannelNormalisation("zscore"))
    order = int((conf.get("resampling_fn_data_kwargs") or {}).get("order", 3))
    return Plans(
        dataset_name=str(model.plans_json.get("dataset_name") or model.dataset_json.get("name") or model.folder.name),
        channel_names=channels, labels=model.labels, target_spacing=to_image(conf["spacing"]),
        normalisation=tuple(norms), patch_size=to_image(conf["patch_size"]), batch_size=int(conf.get("batch_size", 2)),
        median_shape=to_image(conf.get("median_image_size_in_voxels") or (0, 0, 0)),
        resampling={"image_order": order if order in (0, 1, 3) else 3, "label": "linear"},
        planner={"source": "nnU-Net v2", "folder": str(model.folder), "configuration": model.configuration,
                 "plans_name": model.plans_json.get("plans_name")},
    )
