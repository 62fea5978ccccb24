"""Triton-free serving adapters behind the thin `model_repository/<model>/1/model.py` files.

`contract` declares the Triton model graph (tensors, parameters, ensemble steps); `preprocess`, `encode`, `llm` and
`detokenize` are the logic of preprocessing, mimo_encoder, mimo_llm and postprocessing; `offline` runs the same
pipeline in one process; `triton_config` holds what the model.py files share.
"""
