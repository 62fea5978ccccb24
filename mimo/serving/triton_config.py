"""What the model.py adapters share: config.pbtxt parameters, instance device, dtype, DLPack inputs, per-request
responses of the CPU processing models, stub exit. (The stub's `triton_python_backend_utils` is passed in where
needed: mimo imports no Triton module.)"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from mimo.processing.errors import ProcessingError


def model_parameter(model_config: Mapping, name: str, cast: type = str):
    """`parameters { key: name value { string_value: ... } }` of a parsed model config, converted by `cast`."""
    try:
        raw = model_config["parameters"][name]["string_value"]
    except KeyError:
        raise KeyError(f"model {model_config.get('name')!r} has no parameter {name!r} in its config.pbtxt") from None
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"parameter {name!r} must be {cast.__name__}, got {raw!r}") from None


def yes_no_parameter(model_config: Mapping, name: str) -> bool:
    """A parameter that must be "yes" or "no"."""
    raw = model_parameter(model_config, name)
    if raw not in ("yes", "no"):
        raise ValueError(f"parameter {name!r} must be yes or no, got {raw!r}")
    return raw == "yes"


def knob_parameters(model_config: Mapping, names: Iterable[str]) -> dict[str, int | None]:
    """Integer knobs (`mimo.engine.engine.knob` fields) from their parameters; "" stands for None."""
    return {name: None if model_parameter(model_config, name) == "" else model_parameter(model_config, name, int)
            for name in names}  # fmt: skip


def instance_device(args: Mapping[str, str]) -> torch.device:
    """The device of a model instance from the `initialize` args (instance_group kind and device id).

    A GPU device is also made this process's current device: Triton runs one stub process per instance, places
    KIND_GPU instances on every listed GPU, and DLPack export (`Tensor.__dlpack__`) refuses a tensor that is not on
    the current device (seen on a 2-GPU H200: the instance on cuda:1 failed every image request).
    """
    if args["model_instance_kind"] == "GPU":
        device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def torch_dtype(name: str) -> torch.dtype:
    """A deployment dtype (mimo.serving.contract.EMBEDDING_DTYPES) as torch's dtype of that name."""
    from mimo.serving.contract import EMBEDDING_DTYPES  # not at the top: contract imports modules that import this one

    if name not in EMBEDDING_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {name!r}")
    return getattr(torch, name)


def torch_inputs(request) -> dict[str, torch.Tensor]:
    """A Triton request's numeric input tensors via DLPack, on the device Triton placed them (no copy)."""
    return {tensor.name(): torch.from_dlpack(tensor) for tensor in request.inputs()}


def processing_response(pb_utils, request, input_names: list[str],
                        process: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], what: str):  # fmt: skip
    """One request of a model that works request by request (preprocessing, media_preprocessing): `process` of its
    inputs as the response, or its error: a ProcessingError (bad input) as INVALID_ARG with its message, anything
    else logged and INTERNAL; either fails this request only."""
    inputs = {}
    for name in input_names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            inputs[name] = tensor.as_numpy()
    try:
        outputs = process(inputs)
    except ProcessingError as error:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
    except Exception as error:  # noqa: BLE001 - fail this request only; the batch and the model go on
        pb_utils.Logger.log_error(f"{what} failed: {traceback.format_exc()}")
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{what} failed: {error}"))
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, array) for name, array in outputs.items()])


def exit_stub_process() -> None:
    """The last statement of a model's `finalize()`: end this Python-backend stub without its teardown.

    python_backend (r24.10 `pb_stub.cc`, `RunCommand`) has already acknowledged the finalize request when it calls
    `finalize()`; tritonserver only `waitpid`s for the stub from then on, and removes the shared-memory region
    itself. What the stub would still do (close its CUDA IPC mapping of Triton's pool, drop the model,
    `Py_Finalize`, libtorch / CUDA static destructors) is reclaimed by the kernel and the driver anyway, and is
    where a stub that ran CUDA kernels on its main thread intermittently hangs until Triton's exit timeout
    (measured on an H200: mimo_encoder after encoding an image, 3 of 4 shutdowns; mimo_llm after the e2e suite). `MIMO_STUB_FAST_EXIT=0` keeps
    the normal teardown, to debug it.
    """
    if os.environ.get("MIMO_STUB_FAST_EXIT", "1") == "0":
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
