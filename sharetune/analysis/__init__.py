"""Representation analysis: linear CKA between layers, and its heatmap."""

from sharetune.analysis.cka import cka_matrix, linear_cka, plot_cka

__all__ = ["cka_matrix", "linear_cka", "plot_cka"]
