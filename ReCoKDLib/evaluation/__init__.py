"""Evaluation: Dice, HD95 and normalised surface Dice per class (MONAI), per case and per folder."""

from .metrics import METRICS, CaseScores, FolderEvaluation, evaluate_folders, format_table, score_case, summarise, write_csv

__all__ = ["METRICS", "CaseScores", "FolderEvaluation", "evaluate_folders", "format_table", "score_case", "summarise", "write_csv"]
