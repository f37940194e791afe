"""Workflows: what a command runs from start to end, built from the rooms before it.

- :mod:`.runs`          ``recokd train`` / ``distill``: plan, preprocess, train a run folder
- :mod:`.demo`          ``recokd demo`` on the built-in phantom, and its figure (:mod:`.reporting`)
- :mod:`.study`         ``recokd benchmark-study``: a resumable scheduler of ``recokd`` subprocesses
- :mod:`.study_report`  the study's report (tables, figures) from whatever has finished
"""
