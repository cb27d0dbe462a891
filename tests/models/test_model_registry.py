"""models.registry: names, dtypes and the device "auto" decides for."""

import pytest
import torch

from attnzoo.models import registry
from attnzoo.models.registry import resolve_dtype


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_auto_dtype_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, cpu_bf16: bool) -> None:
    monkeypatch.setattr(registry, "native_bf16", lambda: cpu_bf16)
    want = torch.bfloat16 if cpu_bf16 else torch.float32
    assert resolve_dtype("auto") == want and resolve_dtype("auto", "cpu") == want


@pytest.mark.parametrize("cpu_bf16", [True, False])
@pytest.mark.parametrize("gpu_bf16", [True, False])
def test_auto_dtype_on_cuda_reads_the_gpu_not_the_host(monkeypatch: pytest.MonkeyPatch, cpu_bf16: bool,
                                                      gpu_bf16: bool) -> None:
    monkeypatch.setattr(registry, "native_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    assert resolve_dtype("auto", torch.device("cuda")) == (torch.bfloat16 if gpu_bf16 else torch.float32)


def test_named_dtypes_and_errors() -> None:
    assert resolve_dtype("bf16") == resolve_dtype("bfloat16", "cuda") == torch.bfloat16
    assert resolve_dtype(torch.float64) == torch.float64
    with pytest.raises(ValueError, match="unknown dtype 'half'; allowed: auto"):
        resolve_dtype("half")
