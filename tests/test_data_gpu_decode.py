"""The nvJPEG decode (`decode_jpeg_batch_gpu`) waits for its stream's queued work before
torchvision decodes: torchvision takes the outputs from the current stream's pool but
writes them from a stream of its own, so blocks freed with kernels still queued (the
previous batch's stack and flip) could otherwise be overwritten before those kernels read
them (pytorch/vision#9606). Without a GPU, torchvision and the stream are stand-ins that
record the order of the calls."""

from __future__ import annotations

import sys
import types

import torch

from fr_trainer.data import decode


def test_the_gpu_decode_waits_for_its_stream_before_torchvision_writes(monkeypatch) -> None:
    calls: list[str] = []

    class Stream:
        def synchronize(self) -> None:
            calls.append("synchronize")

    def decode_jpeg(datas, mode, device):
        calls.append("decode")
        return [torch.zeros(3, 4, 4, dtype=torch.uint8) for _ in datas]

    io = types.SimpleNamespace(ImageReadMode=types.SimpleNamespace(RGB="RGB"), decode_jpeg=decode_jpeg)
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", io)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    images = decode.decode_jpeg_batch_gpu([torch.zeros(8, dtype=torch.uint8)] * 2, torch.device("cpu"), 4)
    assert calls == ["synchronize", "decode"]
    assert images.shape == (2, 3, 4, 4)
