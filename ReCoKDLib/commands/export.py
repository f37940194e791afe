"""``recokd export`` (run folder -> bundle, or run / bundle -> nnU-Net v2 results folder) and
``recokd export-model`` (bundle -> ONNX / TorchScript / nnU-Net)."""

from __future__ import annotations

import argparse

from ..errors import ReCoKDError


def run_export(args: argparse.Namespace) -> int:
    if getattr(args, "format", "bundle") == "nnunet":
        return _export_nnunet(args.run, args.output, args.dataset_id, args.overwrite)
    from ..deployment.bundle import bundle_from_run
    from ..inference.export import export_bundle, sidecar_path

    reference = None
    if args.reference_image:
        from ..data.datasets import read_header

        reference = read_header(args.reference_image).geometry.direction
    _check_export_target(args)  # before the run is read and packed
    terminology = _read_json_option(args.terminology, "--terminology")
    if terminology is not None:
        from ..utils.labels import check_terminology

        check_terminology(terminology, f"--terminology {args.terminology}")
    card = _read_json_option(args.card, "--card")
    if card is not None:
        from ..deployment.card import check_card

        card = check_card(card, f"--card {args.card}")
    extras = {"card": card, "terminology": terminology,
              "test_metrics": _read_json_option(args.test_metrics, "--test-metrics"),
              "license": args.license, "postprocessing": args.postprocess}
    bundle = bundle_from_run(args.run, name=args.name, weights=args.weights, reference_direction=reference,
                             description=args.description, **extras)
    path = bundle.save(args.output, overwrite=args.overwrite)
    print(f"bundle: {path} ({bundle.describe()})")
    for fmt, wanted in (("onnx", args.onnx), ("torchscript", args.torchscript)):
        if wanted:
            print(f"{fmt}: {export_bundle(bundle, fmt, sidecar_path(path, fmt), overwrite=args.overwrite)}")
    return 0


def _export_nnunet(source, output, dataset_id: int, overwrite: bool) -> int:
    from ..deployment.bundle import open_model
    from ..deployment.nnunet_export import export_notes, export_nnunet

    bundle = open_model(source)  # once: a run folder is packed (and its weights checked) only here
    folder = export_nnunet(bundle, output, dataset_id=dataset_id, overwrite=overwrite)
    print(f"nnU-Net v2 model folder: {folder}")
    for note in export_notes(bundle):
        print(note)
    dataset = folder.parent.name
    print(f"use it: copy {folder.parent} into $nnUNet_results, then nnUNetv2_predict -i IN -o OUT -d {dataset} "
          f"-c 3d_fullres -f 0 (or nnUNetv2_predict_from_modelfolder -m {folder} -f 0)")
    return 0


def _check_export_target(args: argparse.Namespace) -> None:
    """-o must be new or an earlier bundle (the rule of :mod:`ReCoKDLib.utils.outputs`), and not inside
    the run being exported; checked again, atomically, when the bundle is written."""
    from pathlib import Path

    from ..deployment.bundle import _is_bundle_file, _is_bundle_folder
    from ..utils.outputs import check_output_file, check_output_folder

    out, run = Path(args.output), Path(args.run)
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise ReCoKDError(f"-o {out} lies in the run folder {run} being exported; choose a path outside it")
    if out.suffix.lower() in (".recokd", ".zip"):
        check_output_file(out, overwrite=args.overwrite, kind="model bundle", is_kind=_is_bundle_file)
    else:
        check_output_folder(out, overwrite=args.overwrite, kind="model bundle", is_own=_is_bundle_folder)
    from ..inference.export import sidecar_path

    for fmt, wanted in (("onnx", args.onnx), ("torchscript", args.torchscript)):
        if wanted:  # the side files too, before the bundle is written
            check_output_file(sidecar_path(out, fmt), overwrite=args.overwrite, kind=f"{fmt} export")


def _read_json_option(path, option: str):
    if not path:
        return None
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReCoKDError(f"cannot read {option} file {path}: {exc}; give a JSON file") from None


def run_export_model(args: argparse.Namespace) -> int:
    from ..deployment.bundle import load_bundle
    from ..inference.export import export_bundle

    if args.format == "nnunet":
        if not args.output:
            raise ReCoKDError("--format nnunet needs -o FOLDER (where Dataset<NNN>_<name>/ is written)")
        return _export_nnunet(args.bundle, args.output, args.dataset_id, args.overwrite)
    bundle = load_bundle(args.bundle)
    print(export_bundle(bundle, args.format, args.output, overwrite=args.overwrite))
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from ..deployment.registry import DownloadProgress, fetch_model, load_registry

    reg = load_registry(args.registry)
    if args.list:
        for name in reg.names():
            e = reg[name]
            print(f"{name}\t{e.url}\t{e.description}")
        return 0
    if not args.name:
        raise ReCoKDError("give a model NAME to fetch (or --list)")
    entry = reg[args.name]
    # a download bar on stderr (none for a cached model); the path alone goes to stdout, after the bar
    bar = None if getattr(args, "no_progress", False) else DownloadProgress(entry)
    try:
        path = fetch_model(entry, cache_dir=args.cache, base=reg.base, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    print(path)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..inference.postprocessing import POSTPROCESSING

    p = sub.add_parser("export", help="package a training run as a model bundle (.recokd)",
                       description="Package a training run folder (run.json, plans.json, network.json, weights) as a "
                       "model bundle; optionally also as ONNX / TorchScript files next to it.")
    p.add_argument("run", help="training run folder (with --format nnunet also a .recokd bundle)")
    p.add_argument("-o", "--output", required=True,
                   help="bundle path: NAME.recokd (one file) or a folder; with --format nnunet, the folder that "
                   "receives Dataset<NNN>_<name>/nnUNetTrainer__nnUNetPlans__3d_fullres")
    p.add_argument("--format", choices=["bundle", "nnunet"], default="bundle",
                   help="bundle (default): a ReCoKD model bundle; nnunet: an nnU-Net v2 results folder (stock "
                   "PlainConvUNet, for nnUNetv2_predict and SlicerNNUnet)")
    p.add_argument("--dataset-id", dest="dataset_id", type=int, default=999,
                   help="with --format nnunet: the Dataset<NNN> number (default 999)")
    p.add_argument("--name", help="model name (default: the run folder's name)")
    p.add_argument("--weights", choices=["best", "final"], default="best", help="which weights (default best)")
    p.add_argument("--reference-image", dest="reference_image",
                   help="a training image whose direction inputs are reoriented to (default: read from the run's dataset)")
    p.add_argument("--description", help="one line shown in model lists (default: role, dataset and method)")
    p.add_argument("--terminology", help="JSON {label name: {category: [scheme, code, meaning], type: [...]}}: "
                   "standard codes (e.g. SNOMED-CT) that Slicer gives the segments")
    p.add_argument("--test-metrics", dest="test_metrics",
                   help="JSON from `recokd evaluate --json` on held-out cases, recorded in the bundle's provenance")
    p.add_argument("--card", help="JSON with the model card's statements only a person can make: intended_use, "
                   "modality, field_of_view, intensities, training_data, accuracy (cross-validated mean +- sd, n), "
                   "limitations; the rest of the card is derived from the run")
    p.add_argument("--license", help="terms of use of the model (follow its training data's), recorded in the bundle")
    p.add_argument("--postprocess", choices=POSTPROCESSING,
                   help="label post-processing the model's predictions get by default (choose it on held-out cases "
                   "with recokd predict --postprocess; default: none recorded)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier bundle (and its ONNX / TorchScript files) at -o; nothing else is replaced")
    p.add_argument("--onnx", action="store_true", help="also write NAME.onnx")
    p.add_argument("--torchscript", action="store_true", help="also write NAME.torchscript.pt")
    p.set_defaults(func=run_export)

    q = sub.add_parser("export-model", help="export a bundle's network to ONNX or TorchScript")
    q.add_argument("bundle", help="model bundle (.recokd or folder)")
    q.add_argument("--format", choices=["onnx", "torchscript", "nnunet"], required=True)
    q.add_argument("-o", "--output", help="output file (default: next to the bundle); nnunet: the folder that "
                   "receives Dataset<NNN>_<name>/")
    q.add_argument("--dataset-id", dest="dataset_id", type=int, default=999,
                   help="with --format nnunet: the Dataset<NNN> number (default 999)")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier export of this format at -o")
    q.set_defaults(func=run_export_model)

    f = sub.add_parser("fetch-model", help="download (or find in the cache) a model listed in a registry",
                       description="Fetch a bundle by name from a registry JSON, verifying its sha256; cached per user "
                       "($RECOKD_HOME/models or the platform's cache folder).")
    f.add_argument("name", nargs="?", help="model name in the registry")
    f.add_argument("--registry", required=True, help="registry JSON file")
    f.add_argument("--cache", help="cache folder (default: the per-user model cache)")
    f.add_argument("--list", action="store_true", help="list the registry's models")
    f.set_defaults(func=run_fetch)
