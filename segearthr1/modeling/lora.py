"""LoRA adapters on the LLM, injected in place with peft so our module tree (and checkpoint names
outside the adapted layers) stays the same; `merge_lora` folds them back for export."""
from __future__ import annotations

import logging

from torch import nn

from ..configuration import LoraConfig
from ..errors import DependencyNotFoundError

logger = logging.getLogger(__name__)


def apply_lora(language_model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Inject LoRA layers into `language_model` and freeze its other weights (embeddings and head stay
    trainable when `cfg.train_embeddings`)."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model
    except ImportError as err:  # peft is a declared dependency; this names the fix if it is missing
        raise DependencyNotFoundError(what="LoRA needs peft", hint="pip install peft") from err
    names = {name.rsplit(".", 1)[-1] for name, module in language_model.named_modules() if isinstance(module, nn.Linear)}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise ValueError(f"lora.target_modules {missing} name no Linear layer of the LLM; available: {sorted(names)}")
    peft_config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                 target_modules=list(cfg.target_modules), bias="none")
    language_model = inject_adapter_in_model(peft_config, language_model)
    for name, param in language_model.named_parameters():
        param.requires_grad = "lora_" in name
    if cfg.train_embeddings:
        language_model.get_input_embeddings().requires_grad_(True)
        language_model.get_output_embeddings().requires_grad_(True)
    trainable = sum(p.numel() for p in language_model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d alpha=%d on %s: %d trainable LLM parameters", cfg.r, cfg.alpha, list(cfg.target_modules),
                trainable)
    return language_model


def merge_lora(language_model: nn.Module) -> int:
    """Fold every LoRA layer into its base Linear and remove the adapter modules. Returns how many."""
    merged = 0
    for name, module in list(language_model.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "merge"):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = language_model.get_submodule(parent_name) if parent_name else language_model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged
