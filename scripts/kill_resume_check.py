"""Kill -9 a training at random moments, resume it, and compare with an uninterrupted run.

Usage: python scripts/kill_resume_check.py [--trials N] [--seed S] [--work DIR]

A reference teacher run trains on a small phantom dataset (deterministic, CPU). Each trial starts the
same run in a fresh folder, SIGKILLs it after a random delay (anywhere: mid-iteration, mid-validation,
mid-checkpoint write), possibly several times, then resumes it to the end. A trial passes when every
tensor of ``checkpoint_latest.pt`` (model, EMA, optimizer, adapters), ``model_best`` and ``model_final``
equals the reference's (``torch.equal``), no temporary ``.partial`` file is left, and the exported
bundle is byte-identical to the reference's export (same sha256). Prints one line per trial and a summary.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _args(data: Path, cache: Path, out: Path) -> list[str]:
    return ["train", str(data), "-o", str(out), "--cache", str(cache), "--epochs", "3", "--iters-per-epoch", "4",
            "--patch-size", "16", "32", "32", "--checkpoint-every", "2", "--deterministic", "--threads", "1",
            "--workers", "1", "--no-progress", "--seed", "5", "--val-max-cases", "1",
            "--patch-budget", "32768", "--max-levels", "4", "--base-filters", "8", "--max-filters", "32"]


def _cli(*argv: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ReCoKDLib.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if "rng" not in str(k):
                yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def _same_run(a: Path, b: Path) -> list[str]:
    diffs = []
    ca = dict(_tensors(torch.load(a / "checkpoint_latest.pt", weights_only=True)))
    cb = dict(_tensors(torch.load(b / "checkpoint_latest.pt", weights_only=True)))
    diffs += [k for k in ca if k not in cb or not torch.equal(ca[k], cb[k])]
    for name in ("model_best.safetensors", "model_final.safetensors"):
        if not (b / name).is_file():
            diffs.append(f"{name} missing")
            continue
        wa, wb = load_file(a / name), load_file(b / name)
        diffs += [f"{name}:{k}" for k in wa if k not in wb or not torch.equal(wa[k], wb[k])]
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="kill_resume_check")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", SOURCE_DATE_EPOCH="1767225600")  # one export time for every bundle
    sys.path.insert(0, str(ROOT))
    from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet

    data = save_dataset_nnunet(generate_dataset(4, shape=(32, 32, 32)), work / "ds")
    cache = work / "cache"
    tick = time.perf_counter()
    assert _cli(*_args(data, cache, work / "reference"), env=env).wait() == 0, "the reference run failed"
    assert _cli("export", str(work / "reference"), "-o", str(work / "reference.recokd"), "--name", "check", env=env).wait() == 0
    duration = time.perf_counter() - tick
    reference_sha = hashlib.sha256((work / "reference.recokd").read_bytes()).hexdigest()
    print(f"reference: {duration:.1f} s, bundle sha256 {reference_sha[:16]}")
    passed = 0
    for trial in range(args.trials):
        out = work / f"trial{trial}"
        kills = rng.randint(1, 3)
        for _ in range(kills):
            proc = _cli(*_args(data, cache, out), "--resume", env=env)
            time.sleep(rng.uniform(0.5, duration))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert _cli(*_args(data, cache, out), "--resume", env=env).wait() == 0, f"trial {trial}: resume failed"
        assert _cli("export", str(out), "-o", str(work / f"trial{trial}.recokd"), "--name", "check", env=env).wait() == 0
        diffs = _same_run(work / "reference", out)
        partial = sorted(p.name for p in out.glob(".*.partial.*"))
        sha = hashlib.sha256((work / f"trial{trial}.recokd").read_bytes()).hexdigest()
        ok = not diffs and not partial and sha == reference_sha
        passed += ok
        print(f"trial {trial}: {kills} kill(s), {'bit-exact' if not diffs else f'{len(diffs)} tensors differ'}, "
              f"{'no' if not partial else len(partial)} partial file(s), bundle {'identical' if sha == reference_sha else 'DIFFERENT'}"
              f" -> {'PASS' if ok else 'FAIL'}", flush=True)
    print(f"{passed}/{args.trials} trials bit-exact with byte-identical bundles")
    return 0 if passed == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
