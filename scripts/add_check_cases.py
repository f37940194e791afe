"""Add a check case (ReCoKDLib/deployment/check_case.py) to each shipped bundle and refresh its registry entry.

The weights, network, plan and card of each bundle stay byte for byte (the zip is rewritten member by member,
the manifest gaining the new member's sha256), so only the bundle's sha256 and size in
ReCoKDLib/resources/models/registry.json change. ``ship_models.sh`` needs none of this: ``recokd export`` adds
the check case itself from the run's validation case. The cases used here (one per model, the window centred
on its labelled structures):

- la2018-left-atrium: the first LA2018-lowres test image (imagesTs) with its label
- acdc-heart: the first ACDC-subset image (patient001, frame 1) with its label
- phantom-abdomen: a phantom case the model never saw (seed 99)

    python scripts/add_check_cases.py        # needs ../shared/data
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import zipfile
from pathlib import Path

from ReCoKDLib.deployment.bundle import MANIFEST, load_bundle, with_check_case
from ReCoKDLib.deployment.check_case import CHECK_MEMBER, label_agreement
from ReCoKDLib.deployment.registry import sha256_file
from ReCoKDLib.utils.io import atomic_write, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "ReCoKDLib" / "resources" / "models"
DATA = ROOT.parent / "shared" / "data"


def case_files(name: str, tmp: Path) -> tuple[list[Path], Path]:
    if name == "la2018-left-atrium":
        image = sorted((DATA / "LA2018-lowres" / "imagesTs").glob("*_0000.nii.gz"))[0]
        return [image], DATA / "LA2018-lowres" / "labelsTs" / image.name.replace("_0000.nii.gz", ".nii.gz")
    if name == "acdc-heart":
        image = DATA / "ACDC-subset" / "imagesTr" / "patient001_frame01_0000.nii.gz"
        return [image], DATA / "ACDC-subset" / "labelsTr" / "patient001_frame01.nii.gz"
    from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet

    folder = save_dataset_nnunet(generate_dataset(1, seed=99), tmp / "phantom")
    return [folder / "imagesTr" / "phantom_000_0000.nii.gz"], folder / "labelsTr" / "phantom_000.nii.gz"


def main() -> None:
    registry_path = MODELS / "registry.json"
    registry = json.loads(registry_path.read_text(encoding="utf-8"))
    for entry in registry["models"]:
        path = MODELS / entry["url"]
        with tempfile.TemporaryDirectory() as tmp:
            images, label = case_files(entry["name"], Path(tmp))
            check = with_check_case(load_bundle(path), images, label).check
        assert check is not None
        with zipfile.ZipFile(path) as zf:  # the members' own bytes: re-serialising could change them
            infos = [i for i in zf.infolist() if i.filename != CHECK_MEMBER]
            data = {i.filename: zf.read(i.filename) for i in infos}
        manifest = json.loads(data[MANIFEST])
        manifest["files"][CHECK_MEMBER] = hashlib.sha256(check).hexdigest()
        data[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
        template = next(i for i in infos if i.filename == "weights.safetensors")

        def write(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w") as out:
                for info in infos:
                    out.writestr(info, data[info.filename])
                member = zipfile.ZipInfo(CHECK_MEMBER, date_time=template.date_time)
                member.compress_type, member.external_attr = zipfile.ZIP_DEFLATED, template.external_attr
                out.writestr(member, check)

        atomic_write(path, write)
        bundle = load_bundle(path)  # loads, every member's checksum verified
        assert bundle.check == check and label_agreement(bundle.build_network(), check) == 1.0
        entry["sha256"], entry["size"] = sha256_file(path), path.stat().st_size
        print(f"{entry['name']}: check case added, sha256 {entry['sha256'][:12]}, {entry['size']} bytes")
    atomic_write_text(registry_path, json.dumps(registry, indent=2) + "\n")


if __name__ == "__main__":
    main()
