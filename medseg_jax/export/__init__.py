"""Sharing a trained model: the model file, its ONNX graph, predicting from it.

`write` turns a run's checkpoint into a model file (with its card, `card`); `from_file`
predicts from one. `onnx_graph` converts a network's forward pass (softmax probabilities,
any batch size) to an ONNX graph with jax2onnx and runs it on the CPU with ONNX Runtime;
both come from the optional ONNX extra, imported only where they are used.
"""
