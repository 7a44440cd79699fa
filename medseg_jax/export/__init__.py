"""Sharing a trained model: the model file, its ONNX graph, predicting from it."""
