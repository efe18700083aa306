"""Choosing the device and the numeric precision for inference."""

from __future__ import annotations

import torch

from conchdb.errors import ConchdbError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks the first CUDA device when one is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConchdbError(f"unknown device {name!r}", "use auto, cpu, cuda or cuda:N", parameter="device") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConchdbError(
                f"device {name!r} asked for, but no CUDA GPU is visible", "use the cpu device", parameter="device"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConchdbError(
                f"device {name!r} does not exist ({torch.cuda.device_count()} GPU(s) visible)",
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
                parameter="device",
            )
    elif device.type != "cpu":
        raise ConchdbError(f"unsupported device {name!r}", "use auto, cpu, cuda or cuda:N", parameter="device")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 autocast on CUDA (near-lossless for CONCH, cosine ~0.99996) and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in PRECISIONS:
        raise ConchdbError(f"unknown precision {name!r}", "use auto, fp32, bf16 or fp16", parameter="precision")
    if name == "fp16" and device.type == "cpu":
        raise ConchdbError(
            "fp16 is not supported on the CPU", "use precision fp32 or bf16 on the CPU", parameter="precision"
        )
    return PRECISIONS[name]
