"""Training/validation splits: deterministic k-fold cross-validation or a fixed list."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ReCoKDError

NUM_FOLDS = 5


def kfold_split(case_ids: Sequence[str], fold: int | str, seed: int = 0, num_folds: int = NUM_FOLDS
                ) -> tuple[list[str], list[str]]:
    """(train, validation) case ids of ``fold``: the sorted ids are shuffled with ``seed`` and cut
    into ``num_folds`` near-equal parts; fold ``k`` validates on part ``k``. ``"all"`` trains on every
    case and validates on all of them too (an optimistic score, for a final model)."""
    ids = sorted(case_ids)
    if not ids:
        raise ReCoKDError("the dataset has no training cases")
    if fold == "all":
        return ids, list(ids)
    k = int(fold)
    if len(ids) < 2:
        raise ReCoKDError(f"cross-validation needs at least 2 cases, the dataset has {len(ids)}; use --fold all")
    n = min(num_folds, len(ids))
    if not 0 <= k < n:
        raise ReCoKDError(f"fold {k} does not exist; choose 0..{n - 1} or 'all'")
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = np.array_split(order, n)
    val = sorted(ids[i] for i in parts[k])
    return [i for i in ids if i not in set(val)], val


def read_case_list(path: str | Path) -> list[str]:
    """The case ids a validation list names (one per line; ``#`` starts a comment), in file order."""
    path = Path(path)
    if not path.is_file():
        raise ReCoKDError(f"validation case list {path} does not exist")
    wanted = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return [w for w in wanted if w]


def fixed_split(case_ids: Sequence[str], val_file: str | Path) -> tuple[list[str], list[str]]:
    """Validation cases listed in ``val_file`` (one id per line, ``#`` comments); the rest train."""
    path = Path(val_file)
    wanted = read_case_list(path)
    ids = sorted(case_ids)
    unknown = [w for w in wanted if w not in ids]
    if unknown:
        raise ReCoKDError(f"{path} lists case {unknown[0]!r}, which is not a training case of the dataset")
    if not wanted:
        raise ReCoKDError(f"{path} lists no case ids; put one per line")
    train = [i for i in ids if i not in set(wanted)]
    if not train:
        raise ReCoKDError(f"{path} lists every case; leave some for training")
    return train, sorted(wanted)


def parse_fold(value: str) -> int | str:
    if value == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise ReCoKDError(f"--fold must be an integer or 'all', got {value!r}") from None
