"""``recokd predict``: segment a file, a case (one file per channel) or a folder of files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ReCoKDError


def run(args: argparse.Namespace) -> int:
    from ..data.datasets import dicom_series_files, group_cases, read_dicom_series, split_file_ending
    from ..inference.predictor import Predictor, check_label_outputs, label_output_ending, write_label
    from ..deployment.registry import resolve_model

    if args.info:  # the model card, nothing segmented
        from ..deployment.bundle import open_model
        from ..deployment.card import format_card

        print(format_card(open_model(resolve_model(args.model, registry=args.registry, progress=not args.no_progress,
                                                   fast=args.fast))))
        return 0
    if not args.input or not args.output:
        raise ReCoKDError("give -i INPUT and -o OUTPUT (or --info to see the model's card)")
    inputs = [Path(p) for p in args.input]
    output = Path(args.output)
    folder_mode = len(inputs) == 1 and inputs[0].is_dir()
    # a folder of one DICOM series is one scan (read with ITK's geometry); a folder of image files, many
    dicom = dicom_series_files(inputs[0]) if folder_mode and not group_cases(inputs[0]) else None
    # where every label map goes is settled and checked before the model is loaded
    if dicom:
        folder_mode = False
        if output.is_dir() or not split_file_ending(output.name)[1]:
            output = output / f"{inputs[0].resolve().name}.nii.gz"
        jobs = [(dicom, output)]
        check_label_outputs(jobs, overwrite=args.overwrite)
    elif folder_mode:
        cases = group_cases(inputs[0])
        if not cases:
            raise ReCoKDError(f"{inputs[0]} holds no image files (.nii.gz, .nrrd, .mha, ...); check the folder")
        if output.exists() and not output.is_dir():
            raise ReCoKDError(f"{output} is a file; give a folder as -o when -i is a folder")
        jobs = [(files, output / f"{case}{label_output_ending(files[0].name)}") for case, files in cases.items()]
        # an output folder equal to the input folder is refused only where a name would collide
        check_label_outputs([(sorted(p for p in inputs[0].iterdir() if p.is_file()), out) for _, out in jobs],
                            overwrite=args.overwrite)
    else:
        for p in inputs:
            if p.is_dir():
                raise ReCoKDError(f"{p} is a folder; give one folder alone, or the channel files of one case")
        if output.is_dir() or not split_file_ending(output.name)[1]:
            stem = split_file_ending(inputs[0].name)[0]
            case = stem[:-5] if len(inputs) > 1 or (len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit()) else stem
            output = output / f"{case}{label_output_ending(inputs[0].name)}"
        jobs = [(inputs, output)]
        check_label_outputs(jobs, overwrite=args.overwrite)

    model = resolve_model(args.model, registry=args.registry, progress=not args.no_progress, fast=args.fast)
    predictor = Predictor(model, device=args.device, overlap=args.overlap, sw_batch_size=args.sw_batch,
                          mirror_tta=args.tta, threads=args.threads, progress=not args.no_progress,
                          check_spacing=not args.force, postprocess=args.postprocess, backend=args.backend,
                          blend=args.blend, precision=args.precision)
    if folder_mode:
        failed, written = [], []
        for files, target in jobs:
            case = split_file_ending(target.name)[0]
            try:
                written.append(predictor.predict_files(files, target, overwrite=args.overwrite))
            except ReCoKDError as exc:  # one bad case should not cost the others; each failure is one line
                failed.append(case)
                print(f"error: {exc}", file=sys.stderr)
                continue
            print(f"{case}: {written[-1]}")
        # what is there now, not what was written: the folder may have been removed or emptied meanwhile
        present = [p for p in written if p.is_file()]
        if len(present) < len(written):
            lost = [split_file_ending(p.name)[0] for p in written if not p.is_file()]
            print(f"note: {len(lost)} written label map(s) are no longer in {output} (removed meanwhile?): "
                  f"{', '.join(lost)[:200]}", file=sys.stderr)
        if failed:
            raise ReCoKDError(f"{len(failed)} of {len(jobs)} case(s) failed ({', '.join(failed)[:200]}; see above); "
                              f"{len(present)} label map(s) are in {output}")
        return 0
    if dicom:
        labels = predictor.predict_image(read_dicom_series(inputs[0]), name=str(inputs[0]))
        print(write_label(labels, output, overwrite=args.overwrite))
        return 0
    print(predictor.predict_files(*jobs[0], overwrite=args.overwrite))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..inference.backends import BACKENDS, PRECISION_CHOICES
    from ..inference.postprocessing import POSTPROCESSING
    from ..inference.sliding_window import WINDOW_WEIGHTS
    from ..utils.outputs import OVERWRITE_HELP

    p = sub.add_parser("predict", help="segment images with a model bundle",
                       description="Segment a 3D image (any SimpleITK format), the channel files of one case, a "
                       "folder of images (channels by the _0000 suffix), or a folder holding one DICOM series; "
                       "labels are written on the input's grid.")
    p.add_argument("-m", "--model", required=True, help="bundle (.recokd or folder), run folder, or registry name")
    p.add_argument("-i", "--input", nargs="+",
                   help="image file(s) of one case, a folder of images, or a folder of one DICOM series")
    p.add_argument("-o", "--output", help="output file, or folder")
    p.add_argument("--info", action="store_true",
                   help="show the model's card (the input it expects, training, accuracy, terms) and stop")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when present, else CPU), cpu, cuda or mps")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--sw-batch", dest="sw_batch", type=int, default=2, help="windows per forward pass (default 2)")
    p.add_argument("--tta", action="store_true",
                   help="mirror test-time augmentation along the axes the model was trained mirrored along (2^n x "
                   "slower; refused for a model trained without mirroring, as the shipped ones are)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default): on the CPU, the engine timed faster for this model and these settings on "
                        "this machine (measured once, remembered; the ONNX graph is exported once and cached), "
                        "PyTorch on CUDA; or torch / onnxruntime / openvino (pip install 'recokd[openvino]')")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                   help="fp32 (default); bf16: PyTorch under bfloat16 autocast or OpenVINO at bf16, faster on CPUs "
                        "with bfloat16 instructions (LA2018 student: 1.85x, same Dice); auto: bf16 where the CPU has "
                        "it natively and the model's check case is labelled as at fp32 on >= 99.9 %% of voxels "
                        "(checked once per machine), else fp32")
    p.add_argument("--blend", choices=WINDOW_WEIGHTS,
                   help="weights of overlapping windows: gaussian (default), constant, nnunet (default for nnU-Net folders)")
    p.add_argument("--postprocess", choices=POSTPROCESSING,
                   help="keep only the largest connected component of the foreground or of each class "
                   "(default: the bundle's choice, else none)")
    p.add_argument("--threads", type=int, help="CPU threads (default: every core but one, so that a busy machine stays responsive)")
    p.add_argument("--registry", help="model registry JSON (for a model given by name; default $RECOKD_REGISTRY)")
    p.add_argument("--fast", action="store_true",
                   help="run the registry model's fast variant (a student at a coarser grid, its entry's 'fast'): "
                        "several times faster, at the accuracy its card states")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--force", action="store_true",
                   help="segment images whose spacing would resample them to an absurd size (normally refused)")
    p.set_defaults(func=run)
