"""Extension Manager packaging: CMake lists every file the module needs, resources exist, metadata validates."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "ReCoKD"
SCHEMAS = Path(__file__).resolve().parent / "schemas"


def _cmake_sets(path: Path) -> dict[str, list[str]]:
    """``set(NAME item item ...)`` blocks of a CMake file (comments stripped), ``${MODULE_NAME}`` resolved."""
    text = "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("set(EXTENSION") else line
                     for line in path.read_text(encoding="utf-8").splitlines())
    sets: dict[str, list[str]] = {}
    for name, body in re.findall(r'\bset\(\s*(\w+)\s+((?:"[^"]*"|[^)"])*)\)', text):
        items = re.findall(r'"[^"]*"|[^\s"]+', body)
        sets[name] = [i.strip('"') for i in items]
    module = (sets.get("MODULE_NAME") or [""])[0]
    return {k: [i.replace("${MODULE_NAME}", module) for i in v] for k, v in sets.items()}


@pytest.fixture(scope="module")
def module_cmake():
    return _cmake_sets(MODULE_DIR / "CMakeLists.txt")


@pytest.fixture(scope="module")
def top_cmake():
    return _cmake_sets(ROOT / "CMakeLists.txt")


def _listed_paths(sets: dict[str, list[str]], *names: str) -> set[Path]:
    return {(MODULE_DIR / item).resolve() for name in names for item in sets.get(name, [])}


def test_every_python_file_is_listed(module_cmake):
    listed = _listed_paths(module_cmake, "MODULE_PYTHON_SCRIPTS", "RECOKDLIB_PYTHON_SCRIPTS")
    wanted = [p for folder in (MODULE_DIR, ROOT / "ReCoKDLib") for p in folder.rglob("*.py")
              if "__pycache__" not in p.parts]
    missing = sorted(p for p in wanted if p.resolve() not in listed)
    hint = "\n".join(f"  {Path('..', p.relative_to(ROOT)) if p.is_relative_to(ROOT / 'ReCoKDLib') else p.relative_to(MODULE_DIR)}"
                     for p in missing)
    assert not missing, f"add these lines to ReCoKD/CMakeLists.txt (MODULE_/RECOKDLIB_PYTHON_SCRIPTS):\n{hint}"


def test_every_listed_file_and_resource_exists(module_cmake):
    names = ("MODULE_PYTHON_SCRIPTS", "RECOKDLIB_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES", "RECOKDLIB_RESOURCES")
    for name in names:
        assert module_cmake.get(name), f"{name} is empty or missing in ReCoKD/CMakeLists.txt"
    missing = sorted(str(p) for p in _listed_paths(module_cmake, *names) if not p.is_file())
    assert not missing, f"listed in ReCoKD/CMakeLists.txt but absent: {missing}"
    # ReCoKDLib's data files (schemas, a default registry) must all be installed too
    data = {p.resolve() for p in (ROOT / "ReCoKDLib").rglob("*.json")}
    assert data <= _listed_paths(module_cmake, "RECOKDLIB_RESOURCES"), "list every ReCoKDLib/**/*.json in RECOKDLIB_RESOURCES"
    ui = MODULE_DIR / "Resources" / "UI" / "ReCoKD.ui"
    icon = MODULE_DIR / "Resources" / "Icons" / "ReCoKD.png"
    assert {ui.resolve(), icon.resolve()} <= _listed_paths(module_cmake, "MODULE_PYTHON_RESOURCES")


def test_module_cmake_builds_the_scripted_module_with_tests():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}\s+SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}\s+"
                     r"RESOURCES \$\{MODULE_PYTHON_RESOURCES\}\s+WITH_GENERIC_TESTS\s*\)", text)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_top_level_cmake_has_extension_metadata(top_cmake):
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert top_cmake.get(key) and all(top_cmake[key]), f"{key} is not set"
    assert top_cmake["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert top_cmake["EXTENSION_ICONURL"][0].endswith("ReCoKD/Resources/Icons/ReCoKD.png")
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(ReCoKD)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.find(s) for s in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), "CMake steps missing or out of order"
    assert re.search(r"^project\(ReCoKD\)", text, flags=re.M)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_icon_is_a_128_png():
    assert _png_size(MODULE_DIR / "Resources" / "Icons" / "ReCoKD.png") == (128, 128)


def test_extensions_index_entry_validates(top_cmake):
    schema = json.loads((SCHEMAS / "slicer-extension-catalog-entry.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    entry = json.loads((ROOT / "ReCoKD.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator(schema).validate(entry)
    assert entry["category"] == top_cmake["EXTENSION_CATEGORY"][0]
    assert entry.get("build_dependencies", []) == top_cmake["EXTENSION_DEPENDS"]


def test_catalog_schema_rejects_bad_entries():
    schema = json.loads((SCHEMAS / "slicer-extension-catalog-entry.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    good = json.loads((ROOT / "ReCoKD.json").read_text(encoding="utf-8"))
    for bad in ({k: v for k, v in good.items() if k != "scm_url"}, {**good, "homepage": "x"}, {**good, "tier": 9},
                {**good, "$schema": "https://example.org/other.json"}):
        assert not validator.is_valid(bad), bad


def test_registry_files_shipped_with_the_library_validate():
    from ReCoKDLib.deployment.registry import validate_registry
    from ReCoKDLib.resources import load_schema

    for name in ("registry", "bundle"):
        jsonschema.Draft202012Validator.check_schema(load_schema(name))
    registries = [p for p in (ROOT / "ReCoKDLib").rglob("*.json") if not p.name.endswith(".schema.json")]
    for path in registries:  # a default registry, when one is shipped
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "models" in data:
            validate_registry(data, str(path))


def test_requirements_match_the_installer_and_spare_slicers_packages():
    sys.path.insert(0, str(MODULE_DIR))
    from ReCoKDSlicer.dependencies import PROTECTED, REQUIREMENTS

    lines = [ln.split("#")[0].strip() for ln in (ROOT / "Resources" / "requirements.txt").read_text().splitlines()]
    requirements = sorted(ln for ln in lines if ln)
    assert requirements == sorted(REQUIREMENTS.values())
    names = {re.split(r"[<>=!~ ]", r)[0].lower() for r in requirements}
    assert not names & {"torch", *(p.lower() for p in PROTECTED)}, "torch comes from PyTorchUtils; numpy/SimpleITK are Slicer's"


def test_license_screenshot_and_one_consistent_home(top_cmake):
    """What the ExtensionsIndex reviewers check: a licence, real screenshots, and homepage, source, icon and
    screenshots all in one repository (the one the README names)."""
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0" in license_text
    entry = json.loads((ROOT / "ReCoKD.json").read_text(encoding="utf-8"))
    home = top_cmake["EXTENSION_HOMEPAGE"][0].rstrip("/")
    owner_repo = home.removeprefix("https://github.com/")
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", owner_repo), home
    assert entry["scm_url"].removesuffix(".git") == home
    raw = f"https://raw.githubusercontent.com/{owner_repo}/{entry['scm_revision']}/"
    urls = [*top_cmake["EXTENSION_SCREENSHOTURLS"], *top_cmake["EXTENSION_ICONURL"]]
    for url in urls:
        assert url.startswith(raw), f"{url} is not in {raw}"
        path = ROOT / url.removeprefix(raw)
        assert path.is_file(), f"{url} points at {path}, which is not in the repository"
        width, height = _png_size(path)
        assert min(width, height) >= 128
    assert home in (ROOT / "README.md").read_text(encoding="utf-8"), "the README must say where the extension lives"


def test_catalog_entry_is_formatted_as_the_index_linter_expects():
    """ExtensionsIndex runs prettier on its JSON: two-space indent, one array item per line, final newline."""
    text = (ROOT / "ReCoKD.json").read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"
    assert "\t" not in text and not any(line != line.rstrip() for line in text.splitlines())
    assert "v1.0.1.json" in json.loads(text)["$schema"], "the index validates against catalog schema v1.0.1"


def test_shipped_models_are_installed_with_the_library(module_cmake):
    shipped = sorted((ROOT / "ReCoKDLib" / "resources" / "models").iterdir())
    assert any(p.suffix == ".recokd" for p in shipped) and (ROOT / "ReCoKDLib/resources/models/registry.json").is_file()
    assert {p.resolve() for p in shipped if p.is_file()} <= _listed_paths(module_cmake, "RECOKDLIB_RESOURCES")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"models/*.recokd"' in pyproject and '"models/*.json"' in pyproject
