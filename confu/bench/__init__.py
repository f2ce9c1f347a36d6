"""Benchmarks: Spec-Bench (``specbench``) and its metrics and report (``report``), component benchmarks
(``micro``) and interleaved timing (``timing``). This package file stays import-light.
"""
