"""Evaluation: metrics (nudity, face, object), the protocol driver and its reports.

Nothing here is imported by the JAX runtime; NudeNet and onnxruntime come with the ``eval`` extra.
"""
