"""pytest's root conftest, loaded also when only lessons are collected (pytest notebooks/09_*.ipynb): the lessons'
exercises run with the worked solutions plugged in (labkit.solutions, check.use), so nbval proves that a right
answer passes and reproduces every checked number."""

import os

os.environ.setdefault("LABKIT_SOLUTIONS", "1")
