"""mimo.epd.direct_write alone: a slice target through its request tensors and back; every malformed, missing or
out-of-region field refused naming it; SliceWriter maps each region once (bounded, least recently used out) and
writes exactly the slice, refusing rows of another size. On a GPU (skipped without CUDA): another process, as an
encoder server's mimo_encoder, writes a random bf16 table into a CudaRegion slice of this one by IPC handle, bit
for bit, touching nothing around it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mimo.epd.direct_write import (LANDING_CUDA_DEVICE, LANDING_CUDA_HANDLE, LANDING_OFFSET, LANDING_REGION,
                                   LANDING_REGION_BYTE_SIZE, OUTPUT_BYTE_SIZE, SliceRefused, SliceTarget,
                                   SliceWriter)  # fmt: skip
from mimo.epd.landing import CudaRegion, SystemShmRegion


@pytest.fixture
def region():
    region = SystemShmRegion(1 << 16, key_prefix="mimo_test_")
    yield region
    region.close()


def test_a_target_travels_as_typed_tensors_and_comes_back_equal(region):
    target = SliceTarget.of(region, 4096, 1024)
    arrays = target.arrays()
    assert {name: array.dtype.name for name, array in arrays.items()} == {
        LANDING_REGION: "object", LANDING_REGION_BYTE_SIZE: "int64", LANDING_OFFSET: "int64", OUTPUT_BYTE_SIZE: "int64"}
    assert SliceTarget.from_inputs(arrays) == target and target.kind == "system" and target.region == region.key
    cuda = dataclasses.replace(target, region="mimo_landing_x", cuda_handle=bytes(range(64)), cuda_device=1)
    arrays = cuda.arrays()
    assert arrays[LANDING_CUDA_HANDLE].shape == (1, 64) and arrays[LANDING_CUDA_HANDLE].dtype == np.uint8
    assert SliceTarget.from_inputs(arrays) == cuda and cuda.kind == "cuda"
    assert SliceTarget.from_inputs({OUTPUT_BYTE_SIZE: np.array([[8]], dtype=np.int64)}) is None  # rows in the response


def test_malformed_targets_are_refused_naming_the_field(region):
    good = SliceTarget.of(region, 0, 1024)
    cuda = dataclasses.replace(good, region="mimo_landing_x", cuda_handle=bytes(64), cuda_device=0).arrays()

    def without(arrays, name):
        return {key: value for key, value in arrays.items() if key != name}

    def replaced(arrays, name, value):
        return {**arrays, name: value}

    for arrays, message in (
        (without(good.arrays(), LANDING_OFFSET), "a landing slice needs landing_offset"),
        (without(good.arrays(), OUTPUT_BYTE_SIZE), "a landing slice needs output_byte_size"),
        (without(cuda, LANDING_CUDA_DEVICE), "a landing slice needs landing_cuda_device"),
        (dataclasses.replace(good, offset=region.byte_size - 512).arrays(),
         f"landing_offset {region.byte_size - 512} \\+ output_byte_size 1024 is outside the {region.byte_size}-byte"),
        (dataclasses.replace(good, offset=-256).arrays(), "landing_offset -256 .* is outside"),
        (dataclasses.replace(good, byte_size=0).arrays(), "output_byte_size is 0, not a slice's size"),
        (dataclasses.replace(good, region_byte_size=0).arrays(), "landing_region_byte_size is 0"),
        (dataclasses.replace(good, region="/a/b").arrays(), "landing_region '/a/b' is not a POSIX shared-memory key"),
        (dataclasses.replace(good, region="name").arrays(), "landing_region 'name' is not a POSIX"),
        (replaced(good.arrays(), LANDING_OFFSET, np.array([[0.5]])), "landing_offset must be one INT64 value"),
        (replaced(good.arrays(), LANDING_REGION, np.array([[b"/x", b"/y"]], dtype=np.object_)),
         "landing_region must hold one name"),
        (replaced(cuda, LANDING_CUDA_HANDLE, np.zeros([1, 32], np.uint8)), "landing_cuda_handle must be 64 UINT8"),
        (replaced(cuda, LANDING_CUDA_DEVICE, np.array([[-1]], np.int64)), "landing_cuda_device is -1, not a GPU"),
    ):  # fmt: skip
        with pytest.raises(SliceRefused, match=message):
            SliceTarget.from_inputs(arrays)


def test_the_writer_maps_a_region_once_and_writes_exactly_the_slice(region, tmp_path):
    writer = SliceWriter(max_regions=2)
    region.view(0, region.byte_size).fill_(0xAB)
    rows = torch.randn(4, 16).to(torch.bfloat16)
    target = SliceTarget.of(region, 1024, rows.numel() * 2)
    assert writer.open(target) and not writer.open(target)
    for _ in range(3):
        assert writer.write(rows, target) >= 0
    assert writer.opens == 1 and writer.mapped() == [region.key]
    assert torch.equal(region.view(1024, target.byte_size).view(torch.bfloat16).reshape(4, 16), rows)
    assert bool((region.view(0, 1024) == 0xAB).all())
    assert bool((region.view(1024 + target.byte_size, 1024) == 0xAB).all())
    with pytest.raises(SliceRefused, match=r"the item's rows \[3, 16\] are 96 bytes, output_byte_size is 128: nothing"):
        writer.write(rows[:3], target)
    # the least recently used region is unmapped past max_regions; asked again, it is mapped again
    others = [SystemShmRegion(4096, key_prefix="mimo_test_") for _ in range(2)]
    try:
        for other in others:
            writer.write(rows, SliceTarget.of(other, 0, target.byte_size))
        assert writer.mapped() == [other.key for other in others] and writer.opens == 3
        writer.write(rows, target)
        assert writer.opens == 4 and writer.mapped() == [others[1].key, region.key]
    finally:
        writer.close()
        for other in others:
            other.close()


def test_unknown_and_smaller_regions_are_refused(region):
    writer = SliceWriter()
    with pytest.raises(SliceRefused, match="landing_region '/mimo_test_none': no such shared-memory region"):
        writer.open(dataclasses.replace(SliceTarget.of(region, 0, 256), region="/mimo_test_none"))
    with pytest.raises(SliceRefused, match=f"landing_region_byte_size is {2 * region.byte_size}, but region "
                                           f"'{region.key}' is {region.byte_size} bytes"):  # fmt: skip
        writer.open(dataclasses.replace(SliceTarget.of(region, 0, 256), region_byte_size=2 * region.byte_size))
    assert writer.opens == 0 and writer.mapped() == []
    writer.open(SliceTarget.of(region, 0, 256))
    with pytest.raises(SliceRefused, match=f"landing_region_byte_size is {2 * region.byte_size}"):  # mapped already
        writer.open(dataclasses.replace(SliceTarget.of(region, 0, 256), region_byte_size=2 * region.byte_size))
    writer.close()


WRITER = textwrap.dedent('''
    import json, sys
    import numpy as np
    import torch
    from mimo.epd.direct_write import SliceTarget, SliceWriter

    spec = json.loads(sys.stdin.readline())
    arrays = {name: np.array(value, dtype=dtype) for name, (value, dtype) in spec["arrays"].items()}
    arrays["landing_region"] = np.array([[spec["region"].encode()]], dtype=np.object_)
    target = SliceTarget.from_inputs(arrays)
    generator = torch.Generator().manual_seed(spec["seed"])
    rows = torch.randn(spec["rows"], spec["hidden"], generator=generator).to(torch.bfloat16).to(spec["device"])
    writer = SliceWriter()
    times = [writer.write(rows, target) for _ in range(3)]
    print(json.dumps({"opens": writer.opens, "seconds": times}))
    writer.close()
''')


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_another_process_writes_a_bf16_table_into_a_cuda_slice_bit_for_bit():
    rows, hidden, seed, offset = 2040, 4096, 12, 1 << 20
    byte_size = rows * hidden * 2
    region = CudaRegion(offset + byte_size + (1 << 20), 0, key_prefix="mimo_test_")
    try:
        region.view(0, region.byte_size).fill_(0xAB)
        torch.cuda.synchronize()
        target = SliceTarget.of(region, offset, byte_size)
        arrays = {name: (array.tolist(), array.dtype.name) for name, array in target.arrays().items()
                  if array.dtype != np.object_}  # fmt: skip
        spec = {"arrays": arrays, "region": target.region, "seed": seed, "rows": rows, "hidden": hidden,
                "device": f"cuda:{torch.cuda.device_count() - 1}"}  # fmt: skip
        done = subprocess.run([sys.executable, "-c", WRITER], input=json.dumps(spec) + "\n", capture_output=True,
                              text=True, timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["opens"] == 1 and all(s > 0 for s in report["seconds"]), report
        expected = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        landed = region.view(offset, byte_size).cpu()
        assert torch.equal(landed, expected.view(torch.uint8).reshape(-1)), "the CUDA slice differs from the table"
        assert bool((region.view(0, offset) == 0xAB).all()), "bytes before the slice were written"
        assert bool((region.view(offset + byte_size, 1 << 20) == 0xAB).all()), "bytes after the slice were written"
    finally:
        region.close()
