"""Offline pipeline: data loading, training, evaluation, export and dataset generation."""
