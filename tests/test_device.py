"""The one device resolver: names, checks, and the module-device helper."""
import pytest
import torch

from yoloq.device import DeviceError, module_device, resolve_device
from yoloq.errors import YoloqError


def test_cpu_and_auto_without_a_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device(None) == expected


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", "cuda:-1", "cpu:0 ", ""])
def test_malformed_names_are_one_clear_error(name):
    with pytest.raises(DeviceError, match="expected one of auto, cpu, cuda, cuda:N"):
        resolve_device(name)


def test_missing_gpu_is_a_user_error():
    if torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"cuda:\d+"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        for name in ("cuda", "cuda:0", "cuda:7"):
            with pytest.raises(YoloqError, match="no CUDA GPU is available"):
                resolve_device(name)


def test_module_device():
    assert module_device(torch.nn.Conv2d(1, 1, 1)) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")
