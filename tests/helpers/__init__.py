"""Helpers shared by the tests: small models and checkpoints (`models`), exports with measured
scales and the per-layer MoDiff check (`export`), a synthetic TensorRT-shaped export (`trt`).

Test files import from here, never from each other or from conftest.py (which only holds fixtures).
"""
