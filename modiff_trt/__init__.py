"""modiff-trt: deploy MoDiff-quantized diffusion UNets with TensorRT and ONNX Runtime.

The package is organised by job (see docs/architecture.md):
models (UNets and checkpoint loaders), quant (the PyTorch MoDiff reference), calibrators
(static scales), export (ONNX with Q/DQ and state I/O), engines (runtime backends),
plugins, sampling (schedules and loops) and a thin Typer CLI.
"""

__version__ = "0.1.0"
