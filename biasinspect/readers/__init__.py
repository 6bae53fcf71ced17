"""Readers: one module per format family, each turning a file into ModelDescriptions.

Only modules in this package touch file bytes or import onnx.  None of them imports torch.
"""
