"""Tensor and expert parallelism of the language model: rank layout, process groups, module transform, rank loading."""
