"""Experiments of the lecture's long-term-dependency study: gradient flow and long-lag recall."""
