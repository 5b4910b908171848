"""Representation analysis: linear CKA between layers and CKA-guided sharing plans."""

from sharetune.analysis.cka import cka_matrix, cka_plan, linear_cka, plot_cka

__all__ = ["cka_matrix", "cka_plan", "linear_cka", "plot_cka"]
