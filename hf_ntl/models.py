"""Models by Hub id, local folder or tiny preset: image classifiers (uniform access to features and
head) and unconditional diffusion models (a `UNet2DModel` with its `DDPMScheduler`).

Protection and attacks need two things from any classifier: the pooled penultimate features
(NTP's Fisher regulariser, linear probes) and the classification head (re-initialised by some
attacks, kept trainable under LoRA, excluded from pruning). `forward_with_features` and
`classification_head` give both for every `AutoModelForImageClassification`, by hooking the
input of the head rather than knowing each architecture's internals.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoModelForImageClassification,
    ConvNextConfig,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ViTConfig,
)
from transformers.utils import logging as transformers_logging

from .errors import InputError, missing_local_path, not_local_nor_hub

logger = logging.getLogger(__name__)

# Where image classifiers in transformers keep their head (ResNet, ViT, ConvNeXt, Swin, BEiT,
# DeiT, EfficientNet, MobileNet, RegNet, DINOv2, ... all use `classifier`).
HEAD_ATTRIBUTES = ("classifier", "head", "fc", "score")


class ModelLoadError(InputError):
    """A checkpoint that cannot be used as an image classifier, and what to do about it."""


def _tiny_resnet(image_size: int) -> PretrainedConfig:
    return ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
    )


# Why the tiny transformer-style presets take a larger initialisation than their Hub defaults (0.02): at that
# scale a freshly built model's pooled features are mostly each image's mean colour (a linear fit on it explains
# 93% of tiny-vit's feature variance, 83% of tiny-convnext's, 49% of tiny-resnet's), and on coloured backgrounds
# such as font-digits' the label is not in the colour. ViT's class-token attention is then exactly uniform (an
# average of the patches); ConvNeXt's blocks are switched off by layer scale 1e-6, leaving a near-linear stack of
# convolutions and LayerNorms whose features collapse to one vector at lr 3e-3. Both sat at chance for 5 epochs
# (measured on the first ViT preset, 64 wide and 2 layers deep).


def _tiny_vit(image_size: int) -> PretrainedConfig:
    # Eager attention: second-order gradients through SDPA fail on CPU (SOPHON needs them).
    return ViTConfig(
        image_size=image_size,
        patch_size=max(2, image_size // 8),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        initializer_range=0.1,  # attention that is not uniform from the start (see above)
        attn_implementation="eager",
    )


def _tiny_convnext(image_size: int) -> PretrainedConfig:
    # Blocks switched on (layer scale 1) with a larger initialisation: neither alone leaves chance (see above).
    return ConvNextConfig(
        num_channels=3,
        patch_size=2,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_scale_init_value=1.0,
        initializer_range=0.2,
    )


TINY_PRESETS: dict[str, Callable[[int], PretrainedConfig]] = {
    "tiny-resnet": _tiny_resnet,
    "tiny-vit": _tiny_vit,
    "tiny-convnext": _tiny_convnext,
}


def _label_maps(num_labels: int, class_names: list[str] | None) -> dict[str, dict]:
    names = class_names or [str(i) for i in range(num_labels)]
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def build_tiny_classifier(
    preset: str, num_labels: int, *, image_size: int = 32, class_names: list[str] | None = None, seed: int = 0
) -> PreTrainedModel:
    """A small, randomly initialised classifier built from a config (no Hub, no download).

    Args:
        preset: one of `TINY_PRESETS` (`tiny-resnet`, `tiny-vit`, `tiny-convnext`).
        num_labels: number of classes.
        image_size: input side (ViT needs it for its position embeddings).
        class_names: names recorded as `id2label` in the config.
        seed: initialisation seed (the global RNG state is left untouched).
    """
    if preset not in TINY_PRESETS:
        raise ModelLoadError(f"Unknown tiny preset {preset!r}; choose one of {sorted(TINY_PRESETS)}.")
    _check_class_names(num_labels, class_names)
    config = TINY_PRESETS[preset](image_size)
    config.num_labels = num_labels
    for key, value in _label_maps(num_labels, class_names).items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForImageClassification.from_config(config)


def load_classifier(
    name_or_path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    class_names: list[str] | None = None,
    image_size: int = 32,
    attn_implementation: str | None = None,
    revision: str | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """Load an image classifier by Hub id, local folder or tiny preset name.

    When `num_labels` differs from the checkpoint's, the head is replaced by a freshly initialised
    one of the right size (the encoder keeps its pre-trained weights). Only safetensors weights are
    read: a pickled `pytorch_model.bin` is refused rather than unpickled.

    Args:
        name_or_path: a tiny preset (`tiny-resnet`, ...), a `save_pretrained` folder, or a Hub id
            such as `"microsoft/resnet-18"`.
        num_labels / class_names: the label space wanted (names imply the count).
        image_size / seed: for tiny presets only.
        attn_implementation: e.g. `"eager"` (needed for second-order gradients on CPU).
        revision: Hub revision.
    """
    if class_names is not None:
        num_labels = num_labels or len(class_names)
    _check_class_names(num_labels, class_names)
    if str(name_or_path) in TINY_PRESETS:
        if num_labels is None:
            raise ModelLoadError(f"{name_or_path} is a fresh preset: say how many classes (num_labels).")
        return build_tiny_classifier(
            str(name_or_path), num_labels, image_size=image_size, class_names=class_names, seed=seed
        )

    if message := missing_local_path(name_or_path):
        raise ModelLoadError(message)
    kwargs: dict = {"use_safetensors": True, "revision": revision}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if num_labels is not None:
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True, **_label_maps(num_labels, class_names))
    # Asked-for head replacement makes transformers print a table of "mismatched" head weights and a note on
    # the label maps, which say nothing the caller does not know: quiet it here, and say below, in one line
    # each, what did happen (a fresh head; any encoder weight the checkpoint lacked).
    verbosity = transformers_logging.get_verbosity()
    if num_labels is not None:
        transformers_logging.set_verbosity_error()
    try:
        model, loading_info = AutoModelForImageClassification.from_pretrained(
            os.path.expanduser(name_or_path), output_loading_info=True, **kwargs
        )
    except ValueError as err:  # raised for configs that have no image-classification class
        raise ModelLoadError(
            f"{name_or_path} is not an image classifier transformers can load with "
            f"AutoModelForImageClassification ({err}). Point to a classification checkpoint."
        ) from err
    except (OSError, SafetensorError) as err:  # no safetensors, unreachable Hub or no such repository, corrupt
        local = Path(name_or_path).expanduser()
        if not local.exists():
            raise ModelLoadError(not_local_nor_hub(name_or_path, err)) from err
        hint = (
            " It has no model.safetensors: hf_ntl does not unpickle .bin files; convert it with "
            "`model.save_pretrained(folder)` from a trusted environment."
            if local.is_dir() and any(local.glob("*.bin"))
            else ""
        )
        raise ModelLoadError(f"Could not read a classifier from {name_or_path}: {err}.{hint}") from err
    finally:
        transformers_logging.set_verbosity(verbosity)
    head = classification_head_name(model)  # fail now, not hours later, if there is no head
    fresh = set(loading_info["missing_keys"]) | {key for key, *_ in loading_info.get("mismatched_keys", [])}
    fresh_head = any(key.startswith(f"{head}.") for key in fresh)
    if fresh_head and num_labels is None:
        raise ModelLoadError(
            f"{name_or_path} has no trained classification head (it is a base model); pass num_labels "
            "(or class_names) to start from a freshly initialised head on purpose."
        )
    if fresh_head:
        logger.warning("%s: a new %d-way head, freshly initialised.", name_or_path, num_labels)
    encoder = sorted(key for key in fresh if not key.startswith(f"{head}."))
    if encoder and num_labels is not None:
        logger.warning(
            "%s: %d encoder weight(s) were not in the checkpoint and are freshly initialised (e.g. %s).",
            name_or_path,
            len(encoder),
            encoder[0],
        )
    return model


def _check_class_names(num_labels: int | None, class_names: list[str] | None) -> None:
    if num_labels is not None and num_labels < 2:
        raise ModelLoadError(f"A classifier needs at least two classes, got num_labels={num_labels}.")
    if class_names is not None and num_labels is not None and len(class_names) != num_labels:
        raise ModelLoadError(f"{len(class_names)} class names given for num_labels={num_labels}.")


# --------------------------------------------------------------------------------------------
# Uniform access to the head and the pooled penultimate features


def classification_head_name(model: nn.Module) -> str:
    """Name of the head submodule (`"classifier"` for ResNet, ViT and ConvNeXt)."""
    for name in HEAD_ATTRIBUTES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and any(isinstance(m, nn.Linear) for m in module.modules()):
            return name
    raise ModelLoadError(
        f"{type(model).__name__} has no classification head (looked for a linear layer under "
        f"{', '.join(HEAD_ATTRIBUTES)}). Load it with AutoModelForImageClassification."
    )


def classification_head(model: nn.Module) -> nn.Module:
    """The head submodule: it maps the pooled penultimate features to logits."""
    return getattr(model, classification_head_name(model))


def head_linear(model: nn.Module) -> nn.Linear:
    """The last linear layer of the head (the one whose output size is the class count)."""
    return [m for m in classification_head(model).modules() if isinstance(m, nn.Linear)][-1]


def forward_with_features(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the pooled penultimate features `(B, D)` in one forward pass, with gradients.

    The features are the input of the classification head, flattened (ResNet pools to
    `(B, C, 1, 1)`; ViT and ConvNeXt already give `(B, D)`). `model` may be wrapped (DDP inside
    `Trainer`): the head is found on the inner model, the forward goes through the wrapper so
    that gradients are still synchronised. The features come back in fp32 whatever the autocast: what
    takes them (probes, the Fisher ratio: a reduction over the batch) is loss arithmetic.
    """
    captured: list[torch.Tensor] = []
    head = classification_head(extract_model_from_parallel(model))
    hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        logits = model(pixel_values=pixel_values).logits
    finally:
        hook.remove()
    return logits, captured[0].flatten(1).float()


def pooled_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The pooled penultimate features `(B, D)` (see `forward_with_features`)."""
    return forward_with_features(model, pixel_values)[1]


def reinitialise_head(model: PreTrainedModel, seed: int = 0) -> None:
    """Give the head's linear layers fresh weights, as an attacker who discards the head would."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in classification_head(model).modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()


def scratch_copy(model: PreTrainedModel, seed: int = 0, device: torch.device | str | None = None) -> PreTrainedModel:
    """A randomly initialised model of the same architecture and config (the scratch baseline), on `device`
    (default: the model's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(model.config)
    return fresh.to(device or next(model.parameters()).device)


def last_stage(model: PreTrainedModel) -> list[str]:
    """The names of the backbone's last stage and of every module after it, up to the head.

    The stage is the last element of the `nn.ModuleList` that holds most of the backbone's parameters:
    the stack of stages or blocks every Hub vision backbone keeps (`encoder.stages` of a ResNet or
    ConvNeXt, `encoder.layers` of a Swin; the last block of a ViT's `layers`, of an EfficientNet's or
    MobileNet's flat list of blocks). What the backbone registers after that stack (a final norm, an
    EfficientNet's `top_conv`, a MobileNetV2's `conv_1x1`) turns its output into the features the head
    reads, so it belongs to the stage. The head is never part of it (a backbone that is the model
    itself, as CLIP's classifier, registers its head there too).
    """
    backbone = model.base_model
    stacks = [(name, module) for name, module in backbone.named_modules() if isinstance(module, nn.ModuleList)]
    stacks = [(name, module) for name, module in stacks if len(module)]
    if not stacks:
        raise InputError(
            f"{type(model).__name__} has no stack of stages (no nn.ModuleList in its backbone): the attack that "
            "re-initialises the last stage cannot run on it; leave it out (--attacks, or a suite YAML without "
            "reinit_last_stage)."
        )
    stack_name, stack = max(stacks, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    # named_modules() walks depth first in registration order: after the stack and its own modules come the
    # modules registered after it.
    names = [name for name, _ in backbone.named_modules()]
    following = [name for name in names[names.index(stack_name) + 1 :] if not name.startswith(f"{stack_name}.")]
    prefix = f"{model.base_model_prefix}." if backbone is not model else ""
    head = classification_head_name(model)
    following = [name for name in following if prefix + name != head and not (prefix + name).startswith(f"{head}.")]
    outermost = [name for name in following if not any(name.startswith(f"{other}.") for other in following)]
    return [prefix + name for name in (f"{stack_name}.{len(stack) - 1}", *outermost)]


def reinitialise_last_stage(model: PreTrainedModel, seed: int = 0) -> None:
    """Give the backbone's last stage (`last_stage`) fresh weights, as an attacker who keeps only the early
    features would: those of a model of the same architecture built from its config with `seed`, so every
    parameter and buffer starts as the architecture initialises it (layer scales, running statistics included).

    Not `PreTrainedModel._init_weights` on the model itself: on a model loaded with `from_pretrained`,
    transformers 5 marks every loaded parameter as initialised and that method then leaves it as it is.
    """
    fresh = scratch_copy(model, seed, device="cpu")  # only a few modules' state is copied from it: keep it off the GPU
    for name in last_stage(model):
        model.get_submodule(name).load_state_dict(fresh.get_submodule(name).state_dict())


# ---------------------------------------------------------------------------------------- diffusion

TINY_UNET_PRESET = "tiny-unet"


@contextmanager
def running_statistics_frozen(model: nn.Module) -> Iterator[None]:
    """Within this block, batch-norm layers in training mode still normalise with the batch's statistics
    but leave their running statistics (and batch counters) as they were.

    For passes over data whose statistics must not become the model's: the running statistics are what
    the model uses in eval mode, so they must stay those of the domain it serves. Done with a momentum of
    0 (running = (1 - 0) * running + 0 * batch) rather than eval mode, which would change the forward
    pass itself.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, count) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            if count is not None:
                norm.num_batches_tracked.copy_(count)


# accelerate's `--mixed_precision` names and the dtype each autocasts to ("no": full precision).
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def requested_mixed_precision(value: str | None) -> str:
    """`value`, or when unset what `accelerate launch --mixed_precision` asked for (it says so through
    `ACCELERATE_MIXED_PRECISION`, as `Trainer` reads it), else "no"; an unknown value is an input error."""
    value = value or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if value not in MIXED_PRECISION:
        raise InputError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {value!r}.")
    return value


def autocast(device: torch.device, mixed_precision: str = "no") -> AbstractContextManager:
    """Autocast forward passes to `mixed_precision` ("no", "bf16", "fp16"), as accelerate does for `Trainer`.

    Weights, gradients and optimiser state stay fp32, and autocast itself keeps the loss reductions
    (cross-entropy, softmax, norms) in fp32; only matrix products and convolutions run in half precision.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise InputError(f"mixed_precision must be one of {sorted(MIXED_PRECISION)}, got {mixed_precision!r}.")
    dtype = MIXED_PRECISION[mixed_precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def build_tiny_ddpm(image_size: int = 16, channels: int = 3, seed: int = 0) -> tuple[UNet2DModel, DDPMScheduler]:
    """A small, randomly initialised UNet (0.7 M parameters) with a 1000-step linear DDPM schedule.

    It has what the attacks target in real DDPM UNets: resnet blocks (`conv1`/`conv2`) and
    attention blocks (`to_q/to_k/to_v/to_out.0`), at a size that trains on CPU in minutes.
    """
    if image_size < 8 or image_size % 4:
        raise ModelLoadError(
            f"The tiny UNet downsamples twice: image_size must be a multiple of 4 >= 8, got {image_size}."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=image_size,
            in_channels=channels,
            out_channels=channels,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=8,
        )
    return unet, DDPMScheduler(num_train_timesteps=1000)


def load_ddpm(
    name_or_path: str | os.PathLike, *, image_size: int = 16, revision: str | None = None, seed: int = 0
) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load an unconditional diffusion model: the UNet and the DDPM noise schedule of a `DDPMPipeline`.

    Args:
        name_or_path: `tiny-unet` (a fresh tiny preset), a `DDPMPipeline.save_pretrained` folder, or a
            Hub id such as `"google/ddpm-cifar10-32"`. Only safetensors weights are read.
        image_size / seed: for the tiny preset only.
        revision: Hub revision.

    A pipeline saved with another scheduler (DDIM, PNDM, ...) keeps its noise schedule: the
    scheduler is rebuilt as a `DDPMScheduler` from the same config, since training and the
    denoising loss need DDPM's forward process.
    """
    if str(name_or_path) == TINY_UNET_PRESET:
        return build_tiny_ddpm(image_size, seed=seed)
    if message := missing_local_path(name_or_path):
        raise ModelLoadError(message)
    local = Path(name_or_path).expanduser()
    if local.is_dir() and not (local / "model_index.json").is_file():
        kind = " (it holds a transformers config.json: a classifier?)" if (local / "config.json").is_file() else ""
        raise ModelLoadError(
            f"{name_or_path} is not a diffusion pipeline folder: no model_index.json{kind}. Point to a folder "
            "written by DDPMPipeline.save_pretrained (with unet/ and scheduler/), or a Hub id such as "
            "google/ddpm-cifar10-32."
        )
    try:
        pipeline = DDPMPipeline.from_pretrained(
            os.path.expanduser(name_or_path), use_safetensors=True, revision=revision
        )
    except (OSError, ValueError, SafetensorError) as err:  # missing files, no safetensors, unreachable Hub
        if not local.exists():
            raise ModelLoadError(not_local_nor_hub(name_or_path, err)) from err
        raise ModelLoadError(
            f"Could not read a DDPM pipeline from {name_or_path}: {err}. hf_ntl reads safetensors weights only; "
            "convert .bin weights with `pipeline.save_pretrained(folder)` in a trusted environment."
        ) from err
    unet = getattr(pipeline, "unet", None)
    if not isinstance(unet, UNet2DModel):
        raise ModelLoadError(
            f"{name_or_path} holds a {type(unet).__name__} as its unet, not a UNet2DModel: hf_ntl protects "
            "unconditional UNet2DModel pipelines (DDPMPipeline)."
        )
    return unet, DDPMScheduler.from_config(pipeline.scheduler.config)


def save_ddpm(unet: UNet2DModel, scheduler: DDPMScheduler, folder: str | os.PathLike) -> None:
    """Write a `DDPMPipeline` folder (safetensors) that `DDPMPipeline.from_pretrained` loads.

    A peft-wrapped UNet is refused: `DDPMPipeline.save_pretrained` would silently drop it; merge
    the adapters first (`merge_and_unload()`).
    """
    if not isinstance(unet, UNet2DModel):
        raise TypeError(
            f"Only a plain UNet2DModel can be saved as a pipeline, got {type(unet).__name__}; merge LoRA "
            "adapters first (`model.merge_and_unload()`)."
        )
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder), safe_serialization=True)
