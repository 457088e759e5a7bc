"""The fine-tuning runner every attack and every learning-curve point goes through.

An explicit loop rather than `Trainer`: an audit runs hundreds of short, independent fine-tuning
runs on a few samples each, and each process must run its own share without DDP synchronising
it with the others (which `Trainer` would do under `accelerate launch`). The data are encoded
to tensors once per audit, so that a run costs only its optimiser steps.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel, get_scheduler

from ..data.transforms import ImagePreprocessor
from ..errors import InputError
from ..metrics import predict_accuracy
from ..models import (
    autocast,
    classification_head,
    classification_head_name,
    head_linear,
    reinitialise_head,
    reinitialise_last_stage,
)

OPTIMIZERS = ("sgd", "sgd-momentum", "adam", "adamw")
TRAINABLE = ("all", "head", "lora")
MASK_POLICIES = ("dense", "masked")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass(frozen=True)
class AttackSpec:
    """How an attacker fine-tunes: what is trained, with which optimiser, for how long.

    Args:
        name: the attack's name in reports.
        trainable: `"all"` (full fine-tuning), `"head"` (linear probe on frozen features) or
            `"lora"` (low-rank adapters on every conv/linear layer of the encoder via `peft`,
            with the head trainable).
        reinit_head: discard the released head and start from a fresh one.
        reinit_last_stage: also discard the backbone's last stage (`hf_ntl.models.last_stage`) and
            start it afresh, keeping only the earlier features: an attacker who suspects the late
            layers were made to resist. Full, dense fine-tuning only (a frozen or masked fresh
            stage would be no attack).
        optimizer: `sgd`, `sgd-momentum` (0.9), `adam` or `adamw`.
        learning_rate / weight_decay: optimiser settings; `learning_rate` is the peak of a schedule.
        lr_scheduler: the learning-rate schedule over the run's steps, a `transformers.get_scheduler`
            name: `constant`, `constant_with_warmup`, `linear` or `cosine` (decaying towards 0 over the run).
        warmup_ratio: the fraction of the run's steps spent warming the learning rate up from 0
            (with `constant_with_warmup`, `linear` or `cosine`).
        steps: optimiser steps. Without `epochs`, the budget whatever the number of samples;
            with `epochs`, the floor of the budget (small sets still get enough steps).
        epochs: a budget that grows with the data: `max(steps, ceil(epochs * ceil(n / batch_size)))`
            steps on n samples, capped at `max_steps`, so that scratch converges at large n too and
            SLC-AUC measures saved data, not saved compute. The model and the scratch baseline
            always get exactly the same budget.
        max_steps: the ceiling of an epoch budget (`None`: none).
        batch_size: samples per step (all of them when fewer).
        lora_rank / lora_alpha: LoRA rank and scaling numerator (`trainable="lora"` only).
        mask: `"dense"`: pruned (zero) weights may regrow, as any real attacker allows;
            `"masked"`: they are reset to zero after every step (the NTP paper's protocol).
    """

    name: str = "full"
    trainable: Literal["all", "head", "lora"] = "all"
    reinit_head: bool = False
    reinit_last_stage: bool = False
    optimizer: Literal["sgd", "sgd-momentum", "adam", "adamw"] = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    steps: int = 150
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 32
    lora_rank: int = 8
    lora_alpha: float | None = None
    mask: Literal["dense", "masked"] = "dense"

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise InputError(f"{self.name}: trainable must be one of {TRAINABLE}, got {self.trainable!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"{self.name}: unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}.")
        if self.mask not in MASK_POLICIES:
            raise InputError(f"{self.name}: mask must be one of {MASK_POLICIES}, got {self.mask!r}.")
        if self.learning_rate <= 0 or self.steps < 1 or self.batch_size < 1 or self.lora_rank < 1:
            raise InputError(f"{self.name}: learning_rate, steps, batch_size and lora_rank must be positive.")
        if self.epochs is not None and self.epochs <= 0:
            raise InputError(f"{self.name}: epochs must be positive (or left out for a fixed budget of steps).")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise InputError(f"{self.name}: lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}.")
        if not 0 <= self.warmup_ratio < 1 or (self.warmup_ratio and self.lr_scheduler == "constant"):
            raise InputError(
                f"{self.name}: warmup_ratio must lie in [0, 1) and needs a schedule that warms up "
                f"(constant_with_warmup, linear, cosine), got {self.warmup_ratio} with {self.lr_scheduler!r}."
            )
        if self.reinit_last_stage and (self.trainable != "all" or self.mask != "dense"):
            raise InputError(
                f"{self.name}: reinit_last_stage needs trainable='all' and mask='dense' (a fresh last stage that is "
                "frozen or pruned would not be trained)."
            )
        if self.max_steps is not None and self.max_steps < self.steps:
            raise InputError(f"{self.name}: max_steps ({self.max_steps}) is below the floor steps ({self.steps}).")

    def steps_for(self, num_samples: int) -> int:
        """The optimiser steps a run on `num_samples` samples gets (see `steps` and `epochs`)."""
        if self.epochs is None:
            return self.steps
        per_epoch = math.ceil(num_samples / min(self.batch_size, num_samples))
        steps = max(self.steps, math.ceil(self.epochs * per_epoch))
        return steps if self.max_steps is None else min(steps, self.max_steps)

    @property
    def keeps_head(self) -> bool:
        """Whether the released head's outputs are used as they are (so class counts must match)."""
        return not self.reinit_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EncodedSplit:
    """A split as model-ready tensors: `pixel_values` (N, 3, S, S) and `labels` (N,)."""

    pixel_values: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_dataset(cls, dataset: Dataset, preprocessor: ImagePreprocessor, batch_size: int = 512) -> EncodedSplit:
        chunks = [
            preprocessor(dataset[start : start + batch_size]["image"]) for start in range(0, len(dataset), batch_size)
        ]
        return cls(torch.cat(chunks), torch.tensor(dataset["label"], dtype=torch.long))

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: torch.Tensor | list[int]) -> EncodedSplit:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return EncodedSplit(self.pixel_values[indices], self.labels[indices])


class EncodedOnDemand:
    """A split whose images are encoded when a subset first uses them, and kept up to a memory limit.

    An audit draws its learning-curve subsets from the first max(counts) samples of each seed's
    order, and SOPHON's simulated attackers draw batches of the restricted domain: encoding only
    what is drawn keeps memory bounded by what is used, whatever the size of the split (CIFAR-10's
    50,000 images are 30 GB as float32 at 224 px). Past `max_cached_bytes`, samples are encoded
    each time they are drawn instead of kept.
    """

    def __init__(
        self, dataset: Dataset, preprocessor: ImagePreprocessor, batch_size: int = 512, max_cached_bytes: int = 2**30
    ) -> None:
        self.dataset = dataset
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.max_cached = max_cached_bytes // (3 * preprocessor.image_size**2 * 4)  # float32 samples
        self.labels = torch.tensor(dataset["label"], dtype=torch.long)
        self.encoded: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: torch.Tensor | list[int]) -> EncodedSplit:
        indices = torch.as_tensor(indices, dtype=torch.long).tolist()
        missing = sorted(set(indices) - self.encoded.keys())
        fresh: dict[int, torch.Tensor] = {}
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            fresh.update(zip(chunk, self.preprocessor(self.dataset.select(chunk)["image"]), strict=True))
        for index in missing[: max(self.max_cached - len(self.encoded), 0)]:
            self.encoded[index] = fresh[index].clone()  # a copy, so that the rest of its batch can be freed
        pixels = [self.encoded[i] if i in self.encoded else fresh[i] for i in indices]
        return EncodedSplit(torch.stack(pixels), self.labels[indices])


def lora_target_modules(model: nn.Module) -> list[str]:
    """Full names of every LoRA-able layer of the encoder: linear and (non-grouped) conv layers.

    Found from the model, not from a per-architecture list: ResNet's `convolution`s, ViT's
    `q/k/v/o_proj` and `fc1/fc2`, ConvNeXt's `pwconv1/pwconv2` all qualify; the head is excluded
    (it is trained in full instead) and so are depthwise convs, which LoRA does not fit.
    """
    head = classification_head_name(model)
    names = [
        name
        for name, module in model.named_modules()
        if not (name == head or name.startswith(f"{head}."))
        and (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1))
    ]
    if not names:
        raise InputError(f"{type(model).__name__} has no linear or conv layer outside its head for LoRA.")
    return names


def pruning_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{parameter name: weight != 0}` for every encoder weight matrix/kernel holding exact zeros."""
    head = classification_head_name(model)
    return {
        name: param.detach() != 0
        for name, param in model.named_parameters()
        if param.ndim >= 2 and not name.startswith(f"{head}.") and bool((param == 0).any())
    }


def make_optimizer(
    name: str, params: list[torch.Tensor], learning_rate: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimiser an attacker (real or simulated by SOPHON) uses: `sgd`, `sgd-momentum` (0.9), `adam`, `adamw`."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


def prefers_channels_last(model: nn.Module) -> bool:
    """Whether the attack's copy runs faster in channels-last layout: a conv net with BatchNorm (ResNet-style).

    Measured on CPU (2 cores, a training step): tiny-resnet at 32 px 19% faster, ResNet-18 at 224 px 14% faster;
    tiny-convnext 9% slower (its LayerNorms permute around the channels); a ViT has a single conv.
    """
    return any(isinstance(module, nn.BatchNorm2d) for module in model.modules())


def _prepare(model: PreTrainedModel, spec: AttackSpec) -> nn.Module:
    """Make the trainable part of an (already copied) model trainable, per `spec.trainable`."""
    if spec.trainable == "lora":
        config = LoraConfig(
            r=spec.lora_rank,
            lora_alpha=spec.lora_alpha or 2 * spec.lora_rank,
            target_modules=lora_target_modules(model),
            modules_to_save=[classification_head_name(model)],
        )
        with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return get_peft_model(model, config)
    model.requires_grad_(spec.trainable == "all")
    classification_head(model).requires_grad_(True)
    return model


def finetune(
    model: PreTrainedModel, train: EncodedSplit, spec: AttackSpec, seed: int = 0, mixed_precision: str = "no"
) -> nn.Module:
    """Fine-tune a deep copy of `model` on `train` following `spec`; the original is untouched.

    Forward passes autocast to `mixed_precision` ("no", "bf16", "fp16"; fp16 with a gradient scaler,
    which keeps small fp16 gradients from flushing to zero).

    Every source of randomness (head re-initialisation, LoRA initialisation, batch order) comes
    from `seed`, so a run gives the same result in any process and in any order. A LoRA attack
    returns the `peft` model (adapters not merged: merging would hide nothing but cost time).
    """
    if len(train) == 0:
        raise ValueError("Cannot fine-tune on an empty set of samples.")
    num_outputs = head_linear(model).out_features
    if int(train.labels.max()) >= num_outputs:
        raise ValueError(
            f"Labels go up to {int(train.labels.max())} but the head has {num_outputs} outputs; "
            "load the model with the target's class count (num_labels) first."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = copy.deepcopy(model)
        if spec.reinit_head:
            reinitialise_head(model, seed)
        if spec.reinit_last_stage:
            reinitialise_last_stage(model, seed)
        if prefers_channels_last(model):
            model = model.to(memory_format=torch.channels_last)
        masks = pruning_masks(model) if spec.mask == "masked" else {}
        model = _prepare(model, spec)
        masked_params = [(param, masks[name]) for name, param in model.named_parameters() if name in masks]
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(spec.optimizer, trainable, spec.learning_rate, spec.weight_decay)
        steps = spec.steps_for(len(train))
        schedule = get_scheduler(spec.lr_scheduler, optimizer, round(spec.warmup_ratio * steps), steps)
        device = next(model.parameters()).device
        scaler = torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")
        generator = torch.Generator().manual_seed(seed)
        batch_size = min(spec.batch_size, len(train))
        order = torch.empty(0, dtype=torch.long)
        model.train()
        for _ in range(steps):
            if len(order) < batch_size:  # epoch-wise reshuffling: every sample seen once per epoch
                order = torch.cat([order, torch.randperm(len(train), generator=generator)])
            batch, order = order[:batch_size], order[batch_size:]
            with autocast(device, mixed_precision):
                logits = model(pixel_values=train.pixel_values[batch].to(device)).logits
                loss = nn.functional.cross_entropy(logits, train.labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            with torch.no_grad():
                for param, mask in masked_params:
                    param.mul_(mask.to(param.device))
    model.eval()
    return model


def finetuned_accuracy(
    model: PreTrainedModel,
    train: EncodedSplit,
    test: EncodedSplit,
    spec: AttackSpec,
    seed: int = 0,
    mixed_precision: str = "no",
) -> float:
    """Test accuracy after `finetune(model, train, spec, seed, mixed_precision)`."""
    return finetuned_accuracies(model, train, {"test": test}, spec, seed, mixed_precision)["test"]


def finetuned_accuracies(
    model: PreTrainedModel,
    train: EncodedSplit,
    splits: dict[str, EncodedSplit],
    spec: AttackSpec,
    seed: int = 0,
    mixed_precision: str = "no",
) -> dict[str, float]:
    """Accuracy on each of `splits` (e.g. validation and test) of one `finetune(model, train, spec, seed)` run."""
    tuned = finetune(model, train, spec, seed, mixed_precision)
    return {
        name: predict_accuracy(tuned, split.pixel_values, split.labels, scoring_batch(spec, split), mixed_precision)
        for name, split in splits.items()
    }


def scoring_batch(spec: AttackSpec, split: EncodedSplit) -> int:
    """Images scored per forward pass: 256 at 32 px, and at larger sizes no more than the attack's own batch
    (whose training steps hold more activations than a no-grad pass): at 224 px a batch of 256 would hold
    gigabytes of activations on a ResNet-18."""
    pixels = split.pixel_values.shape[-1] * split.pixel_values.shape[-2]
    return max(spec.batch_size, 256 * 32 * 32 // pixels)
