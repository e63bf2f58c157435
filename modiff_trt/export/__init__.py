"""ONNX export with explicit Q/DQ and MoDiff state as graph I/O, manifest and lint."""
