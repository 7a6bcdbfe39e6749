"""Inspection: what the backend did to a model, what it cost in accuracy, what it buys."""
