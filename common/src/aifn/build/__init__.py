"""Build time only (model sources, ONNX export, fine-tuning): never imported by serving, and not
in the serving image."""
