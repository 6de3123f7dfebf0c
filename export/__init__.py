"""Export ResNet50 + global pooling to ONNX once, with a model card, a parity check and INT8 quantisation.

The only part of lookalike that needs TensorFlow; everything after it runs on onnxruntime.
"""

import os

# TensorFlow's C++ start-up chatter would bury the export's progress lines; set before TensorFlow loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
