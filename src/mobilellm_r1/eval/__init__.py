"""Evaluation: the paper's benchmarks (Tables 6-9, 13), graded the way those tables were.

- :mod:`.grading.math`: answer extraction and equivalence for math answers.
- :mod:`.grading.code`: sandboxed execution of generated code against tests.
- :mod:`.tasks`: one module per benchmark (prompt format, data loading, scoring).
- :mod:`.runner`: batched generation, per-sample outputs, summaries with confidence intervals.
"""
