"""The process 3D Slicer's ReCoKD module launches: machine-readable progress on stdout.

The Slicer module never runs the network in Slicer's own process (that would freeze the GUI and
could not be cancelled). It starts ``<Slicer's python> -m ReCoKDLib.inference.slicer_bridge ...`` in a new
process group and reads its standard output, one message per line::

    DEVICE cpu                     the device actually used
    MODEL <path>                   the bundle file used (a registry model: where it was fetched to)
    PROGRESS 0.250                 fraction done (0..1)
    LOG <text>                     something for the log pane
    FETCH <bytes> <total>          a registry model is being downloaded (total 0: unknown)
    FRAME <i> <n>                  frame i (1-based) of n is being segmented (``--frames``)
    DONE <output path> <seconds>   success; the label file is complete (written atomically)
    CHECK <one line>               an input check's finding (the input is unlike the training data); after
                                   the last one, ERROR, and the process exits with status 3: the module
                                   may ask the user and run again with --force
    ERROR <one line>               failure; the process then exits with status 2

Sub-commands:

``segment --model BUNDLE --inputs CH0.nrrd [CH1.nrrd ...] --output LABELS.nrrd [--device auto|cpu|cuda] [--tta]
[--ask | --force] [--frames N]``
    Segment one case with :class:`~ReCoKDLib.inference.predictor.Predictor`. With ``--frames N`` (a cine or
    other time series), ``--inputs`` holds N cases one after the other (frame 0's channels, then frame 1's,
    ...), the network is loaded once, ``--output`` is a folder that receives ``frame_0000.nrrd`` ... and
    ``PROGRESS`` is the share of all frames done.
    ``--ask`` stops before the network runs when the input checks warn (``CHECK`` lines, status 3),
    ``--force`` skips the checks; with neither, warnings are ``LOG warning: ...`` lines and it goes on. Instead of ``--model``
    a registry entry can be given (``--registry-entry JSON --registry-base DIR``): it is fetched into
    the model cache first (verified by sha256, never downloaded twice).
Training and export are plain ``<python> -m ReCoKDLib.cli ...`` processes (Slicer has no ``recokd``
script on its PATH); only segmentation needs this protocol.

It is also usable by hand: ``python -m ReCoKDLib.inference.slicer_bridge segment --model m.recokd --inputs ct.nrrd --output seg.nrrd``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from ..errors import InputCheckError, ReCoKDError
from .backends import BACKENDS

__all__ = ["main", "emit"]


def emit(kind: str, text: object = "") -> None:
    """Print one protocol line (flushed at once, so the reader sees it immediately)."""
    line = " ".join(str(text).split())
    print(f"{kind} {line}".rstrip(), flush=True)


def _segment(args: argparse.Namespace) -> int:
    from .predictor import Predictor
    from ..deployment.registry import RegistryEntry, fetch_model

    start = time.perf_counter()
    if args.registry_entry:
        entry_data = json.loads(args.registry_entry)
        entry = RegistryEntry(entry_data["name"], entry_data["url"], entry_data["sha256"],
                              entry_data.get("description", ""), entry_data.get("size"))
        emit("LOG", f"fetching model {entry.name} (cached after the first time)")
        shown = [0, 0]  # bytes received, bytes last reported

        def fetched(done: int) -> None:  # about every 1 % (at least every MiB), so the panel's bar moves
            shown[0] = done
            if done - shown[1] >= max(1 << 20, (entry.size or 0) // 100):
                shown[1] = done
                emit("FETCH", f"{done} {entry.size or 0}")

        model = fetch_model(entry, base=Path(args.registry_base) if args.registry_base else None, progress=fetched)
        if shown[0]:  # downloaded now (not from the cache): the last figure too
            emit("FETCH", f"{shown[0]} {entry.size or shown[0]}")
    elif args.model:
        model = Path(args.model)
        if args.folds:  # an nnU-Net results folder: the folds to ensemble
            from ..deployment.bundle import open_model
            from ..deployment.nnunet_model import open_nnunet_view

            if not hasattr(open_model(model), "model"):
                raise ReCoKDError(f"--folds applies to nnU-Net results folders; {model} is a ReCoKD model")
            model = open_nnunet_view(model, folds=[f for f in args.folds.split(",") if f.strip()])
    else:
        raise ReCoKDError("give --model BUNDLE or --registry-entry JSON")

    delay = max(float(args.debug_delay or 0.0), 0.0)
    frames = int(args.frames)
    if frames < 1 or len(args.inputs) % frames:
        raise ReCoKDError(f"--frames {frames} needs a multiple of {frames} input files (the same channels for every "
                          f"frame), got {len(args.inputs)}")
    channels = len(args.inputs) // frames
    frame = [0]  # the frame being segmented

    def progress(fraction: float) -> None:
        emit("PROGRESS", f"{(frame[0] + fraction) / frames:.4f}")
        if delay:
            time.sleep(delay)  # test hook only: makes the job deterministically slow enough to cancel

    predictor = Predictor(model, device=args.device, mirror_tta=args.tta, threads=args.threads, backend=args.backend,
                          overlap=args.overlap, check_spacing=not args.force, confirm_warnings=args.ask,
                          progress=progress, log=lambda msg: emit("LOG", msg))
    emit("DEVICE", predictor.device)
    emit("MODEL", Path(getattr(getattr(model, "model", None), "folder", model)).resolve())
    emit("LOG", f"model {predictor.bundle.describe()}")
    emit("PROGRESS", "0.0")
    if frames == 1:
        written = predictor.predict_files([Path(p) for p in args.inputs], Path(args.output))
    else:
        written = Path(args.output)
        written.mkdir(parents=True, exist_ok=True)
        for i in range(frames):
            frame[0] = i
            emit("FRAME", f"{i + 1} {frames}")
            predictor.predict_files([Path(p) for p in args.inputs[i * channels:(i + 1) * channels]],
                                    written / f"frame_{i:04d}.nrrd")
    emit("DEVICE", predictor.device)  # may have fallen back to the CPU on out-of-memory
    emit("DONE", f"{written} {time.perf_counter() - start:.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ReCoKDLib.inference.slicer_bridge",
                                     description="Background worker of the 3D Slicer ReCoKD module.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("segment", help="segment one case, printing PROGRESS lines")
    s.add_argument("--model", help="model bundle (.recokd or folder) or training run folder")
    s.add_argument("--registry-entry", dest="registry_entry", help="a registry entry as JSON (fetched into the cache)")
    s.add_argument("--registry-base", dest="registry_base", help="folder relative registry URLs are relative to")
    s.add_argument("--inputs", nargs="+", required=True, help="one image file per channel")
    s.add_argument("--output", required=True, help="label file to write (e.g. .nrrd); with --frames, a folder")
    s.add_argument("--frames", type=int, default=1,
                   help="number of frames (time points) in --inputs, one case after the other (default 1)")
    s.add_argument("--device", default="auto", help="auto (default: CUDA when present, else CPU), cpu, cuda or mps")
    s.add_argument("--tta", action="store_true", help="mirror test-time augmentation (slower)")
    s.add_argument("--folds", help="an nnU-Net results folder as --model: the folds to ensemble, e.g. 0 or 0,1,2 "
                   "(default: every fold with a final checkpoint)")
    checks = s.add_mutually_exclusive_group()
    checks.add_argument("--ask", action="store_true",
                        help="stop with CHECK lines (status 3) when the input is unlike the training data")
    checks.add_argument("--force", action="store_true", help="skip the input checks")
    s.add_argument("--threads", type=int, help="CPU threads (default: every core but one)")
    s.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default: on the CPU the engine timed faster for this model, measured once), "
                        "torch, onnxruntime or openvino")
    s.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    s.add_argument("--debug-delay", dest="debug_delay", type=float, default=0.0, help=argparse.SUPPRESS)
    s.set_defaults(func=_segment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputCheckError as exc:
        for line in exc.lines:
            emit("CHECK", line)
        emit("ERROR", exc)
        return 3
    except ReCoKDError as exc:
        emit("ERROR", exc)
        return 2
    except KeyboardInterrupt:
        emit("ERROR", "interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the module shows one line; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        emit("ERROR", f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
