"""TensorRT plugins, only where a standard-op graph cannot do the job.

Empty on purpose: the MoDiff state update is Sub/Clip/QuantizeLinear/DequantizeLinear/Conv/Add,
all standard ONNX ops that TensorRT fuses, and attention stays standard fp16 MatMul/Softmax.
"""
