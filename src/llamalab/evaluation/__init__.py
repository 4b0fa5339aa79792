"""Evaluation: lm-eval benchmarks, safety, red-teaming and win rates (src/eval.py)."""
