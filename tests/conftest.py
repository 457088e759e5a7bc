"""Offline, fast, deterministic: no Hub access and a per-session cache of generated domains."""

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(autouse=True, scope="session")
def domain_cache(tmp_path_factory):
    """Generated domains go to a fresh folder, so the tests exercise generation, not a stale cache."""
    cache = tmp_path_factory.mktemp("hf_ntl_cache")
    previous = os.environ.get("HF_NTL_CACHE")
    os.environ["HF_NTL_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("HF_NTL_CACHE", None)
    else:
        os.environ["HF_NTL_CACHE"] = previous


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)


@pytest.fixture
def matmul_dtypes():
    """`record(model)`: a context in which the output dtypes of the model's linear and conv layers are collected
    in the set it yields (how a test sees whether autocast really ran)."""
    from contextlib import contextmanager

    @contextmanager
    def record(model):
        seen = set()
        layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
        hooks = [layer.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype)) for layer in layers]
        try:
            yield seen
        finally:
            for hook in hooks:
                hook.remove()

    return record


@pytest.fixture
def load_into_peft():
    """`load(state, peft_model, lora_weights)`: give a simulated LoRA attacker's copy (`AttackerState`) nonzero B
    factors (fresh ones are zero, which would hide the deltas) and copy its factors into a `peft` LoRA model of the
    same network, so that the two can be compared."""

    def load(state, peft_model, lora_weights) -> None:
        peft_weights = dict(peft_model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.trainable.items():
                if name.endswith("lora_B"):
                    tensor.normal_(std=0.1)
            for name in lora_weights:
                module = name.removesuffix(".weight")
                for part in "AB":
                    target = peft_weights[f"base_model.model.{module}.lora_{part}.default.weight"]
                    target.copy_(state.trainable[f"{name}.lora_{part}"].view_as(target))

    return load
