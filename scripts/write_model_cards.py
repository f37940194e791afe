"""Write the model cards of configs/model_cards/ into the shipped bundles and refresh their registry entries.

The weights, network and plan of each bundle stay byte for byte (the zip is rewritten member by member);
only its manifest gains the ``card``
(deployment/card.py), so its sha256 and size in ReCoKDLib/resources/models/registry.json are updated.
``ship_models.sh`` passes the same files to ``recokd export --card`` when it rebuilds the models.

    python scripts/write_model_cards.py
"""

from __future__ import annotations

import json
from pathlib import Path

import zipfile

from ReCoKDLib.deployment.bundle import MANIFEST, load_bundle
from ReCoKDLib.deployment.card import check_card
from ReCoKDLib.deployment.registry import sha256_file
from ReCoKDLib.utils.io import atomic_write, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "ReCoKDLib" / "resources" / "models"


def main() -> None:
    registry_path = MODELS / "registry.json"
    registry = json.loads(registry_path.read_text(encoding="utf-8"))
    for entry in registry["models"]:
        card_file = ROOT / "configs" / "model_cards" / f"{entry['name']}.json"
        path = MODELS / entry["url"]
        card = check_card(json.loads(card_file.read_text(encoding="utf-8")), str(card_file))
        with zipfile.ZipFile(path) as zf:  # the members' own bytes: re-serialising could change them
            infos = zf.infolist()
            data = {i.filename: zf.read(i.filename) for i in infos}
        manifest = json.loads(data[MANIFEST])
        manifest["card"] = card
        data[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")

        def write(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w") as out:
                for info in infos:
                    out.writestr(info, data[info.filename])

        atomic_write(path, write)
        assert load_bundle(path).manifest["card"] == card  # loads, every member's checksum verified
        entry["sha256"], entry["size"] = sha256_file(path), path.stat().st_size
        print(f"{entry['name']}: card written, sha256 {entry['sha256'][:12]}, {entry['size']} bytes")
    atomic_write_text(registry_path, json.dumps(registry, indent=2) + "\n")


if __name__ == "__main__":
    main()
