"""Evaluation: the one Dice (also training's validation score), HD95 and normalised surface Dice per
class (MONAI), per case and per folder."""

from .metrics import (METRICS, CaseScores, FolderEvaluation, dice_per_class, evaluate_folders, format_table,
                      read_label_map, score_case, summarise, write_csv)

__all__ = ["METRICS", "CaseScores", "FolderEvaluation", "dice_per_class", "evaluate_folders", "format_table",
           "read_label_map", "score_case", "summarise", "write_csv"]
