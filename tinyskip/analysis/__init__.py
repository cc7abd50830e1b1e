"""Measuring: perplexity, quality, unit costs, benchmark reports, plots, notebook readers."""
