"""Model configuration: one `SegEarthR1Config` (saved as config.json beside the weights) with one
sub-config per module. Defaults are the reference (released) model; every ablation switch of
DESIGN.md §6 is a field here, and all validation happens at construction, not at first forward."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .config_io import check_known_keys
from .modeling.vision_encoder import swin_feature_sizes

PHI_1_5_TEXT_CONFIG: dict[str, Any] = {
    # Phi-1.5 as the reference builds it (golden/upstream_keys_full.json "llm_config").
    "model_type": "phi",
    "vocab_size": 51200,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "partial_rotary_factor": 0.5,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attention_dropout": 0.0,
    "layer_norm_eps": 1e-5,
    "hidden_act": "gelu_new",
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "qk_layernorm": False,
}


# MSDeformAttn core (modeling/ms_deform_attn.py resolve_impl): grid_sample as the reference ("pytorch"), one
# weighted gather ("gather"), the compiled op required ("cuda"), or the fastest available ("auto").
DEFORM_ATTN_IMPLS = ("auto", "gather", "pytorch", "cuda")
# The masked-attention decoder cycles over exactly this many multi-scale maps (Mask2Former's 3).
DECODER_FEATURE_LEVELS = 3


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}={value!r} must be > 0")


class _SubConfig:
    """Strict dict <-> dataclass conversion shared by the sub-configs."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = ""):
        data = dict(data or {})
        check_known_keys(data, [f.name for f in dataclasses.fields(cls)], where)
        for f in dataclasses.fields(cls):  # YAML/JSON give lists where we store tuples
            if f.name in data and isinstance(data[f.name], list):
                data[f.name] = tuple(data[f.name])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass
class VisionConfig(_SubConfig):
    """Hierarchical Swin encoder (DESIGN.md §2.2). Channels are derived: embed_dim * 2**stage."""

    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3
    patch_size: int = 4
    frozen: bool = True
    # The reference leaves the frozen encoder in train mode, so drop-path stays active (DESIGN §8).
    # Faithful default True; False puts the frozen encoder in eval mode during training.
    train_mode_when_frozen: bool = True

    def __post_init__(self):
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(f"vision.depths={self.depths} and vision.num_heads={self.num_heads} need 4 stages each")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise ValueError(f"vision stage {i}: width {self.embed_dim * 2**i} not divisible by {heads} heads")
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"vision.drop_path_rate={self.drop_path_rate} must be in [0, 1)")

    @property
    def out_channels(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(4)]


@dataclass
class ConnectorConfig(_SubConfig):
    """Visual-token connector (DESIGN.md §2.3). `sparse_conv` is the reference `SparseConv_1`."""

    kind: str = "sparse_conv"

    def __post_init__(self):
        aliases = {"SparseConv_1": "sparse_conv"}
        self.kind = aliases.get(self.kind, self.kind)
        _check_choice("connector.kind", self.kind, ("sparse_conv", "linear", "mlp2x_gelu", "identity"))


@dataclass
class DescriptionProjectorConfig(_SubConfig):
    """Perceiver-style fusion of the description embedding with res5 features (DESIGN.md §2.5)."""

    kind: str = "perceiver"  # perceiver | none (ablation: a single Linear on the pooled description)
    dim: int = 512
    depth: int = 1
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 1

    def __post_init__(self):
        _check_choice("description_projector.kind", self.kind, ("perceiver", "none"))
        for name in ("dim", "depth", "heads", "dim_head", "ff_mult"):
            _check_positive(f"description_projector.{name}", getattr(self, name))


@dataclass
class PixelDecoderConfig(_SubConfig):
    """Mask2Former MSDeformAttn pixel decoder (DESIGN.md §2.6)."""

    conv_dim: int = 256
    mask_dim: int = 256
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024  # the reference builder hard-codes 1024 regardless of DIM_FEEDFORWARD
    num_encoder_layers: int = 6
    dropout: float = 0.0
    transformer_in_features: tuple[str, ...] = ("res3", "res4", "res5")
    common_stride: int = 4
    deform_attn_impl: str = "auto"  # CPU: one weighted gather; CUDA: the compiled op when importable

    def __post_init__(self):
        _check_choice("pixel_decoder.deform_attn_impl", self.deform_attn_impl, DEFORM_ATTN_IMPLS)
        valid = ("res2", "res3", "res4", "res5")
        for name in self.transformer_in_features:
            _check_choice("pixel_decoder.transformer_in_features[*]", name, valid)
        features = list(self.transformer_in_features)
        if len(features) != DECODER_FEATURE_LEVELS or len(set(features)) != len(features):
            raise ValueError(
                f"pixel_decoder.transformer_in_features={features}: the mask decoder attends to exactly "
                f"{DECODER_FEATURE_LEVELS} distinct levels (one per layer, cycling); choose 3 of {list(valid)}, "
                "e.g. [res3, res4, res5] (the reference)")
        if "res2" in features:
            raise ValueError(f"pixel_decoder.transformer_in_features={features}: res2 is the FPN level that "
                             "mask_features are built from; use three of res3, res4, res5")
        if self.conv_dim % self.num_heads:
            raise ValueError(f"pixel_decoder.conv_dim={self.conv_dim} not divisible by num_heads={self.num_heads}")
        if self.conv_dim % 32:
            raise ValueError(f"pixel_decoder.conv_dim={self.conv_dim} must be a multiple of 32 (GroupNorm(32))")


@dataclass
class MaskDecoderConfig(_SubConfig):
    """Masked-attention transformer decoder (DESIGN.md §2.6). `num_layers` = layers built (reference
    DEC_LAYERS 10 builds 9). `query`: `description` (reference: the description embedding is the single
    query) or `learned` (ablation `use_seg_query`: 100 learned queries matched to the [SEG] embedding)."""

    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    dim_feedforward: int = 2048
    num_layers: int = 9
    pre_norm: bool = False
    enforce_input_project: bool = False
    query: str = "description"
    # Faithful default: the reference's explicit attention kernel (bit-exact). True = SDPA kernel,
    # ~1e-6 different, which can flip masked-attention bits of near-zero logits.
    sdpa_attention: bool = False

    def __post_init__(self):
        _check_choice("mask_decoder.query", self.query, ("description", "learned"))
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"mask_decoder.hidden_dim={self.hidden_dim} not divisible by num_heads={self.num_heads}")
        if self.hidden_dim % 4:
            raise ValueError(f"mask_decoder.hidden_dim={self.hidden_dim} must be a multiple of 4 (sine position code)")
        _check_positive("mask_decoder.num_layers", self.num_layers)


@dataclass
class LossConfig(_SubConfig):
    """Point-sampled mask losses with deep supervision (DESIGN.md §2.7)."""

    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    class_weight: float = 2.0
    llm_weight: float = 1.0
    deep_supervision: bool = True

    def __post_init__(self):
        _check_positive("loss.num_points", self.num_points)
        if not 0 <= self.importance_sample_ratio <= 1:
            raise ValueError(f"loss.importance_sample_ratio={self.importance_sample_ratio} must be in [0, 1]")
        if self.oversample_ratio < 1:
            raise ValueError(f"loss.oversample_ratio={self.oversample_ratio} must be >= 1")


@dataclass
class LoraConfig(_SubConfig):
    """LoRA on the LLM (peft). Off in the reference recipe (the LLM is fully fine-tuned). When on, the
    LLM's base weights are frozen except the embeddings/head if `train_embeddings` (the new `[SEG]`
    and `[PAD]` rows must learn); every other module keeps its own trainability."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
    train_embeddings: bool = True

    def __post_init__(self):
        _check_positive("lora.r", self.r)
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty; name the LLM Linear layers to adapt (e.g. q_proj)")


SUB_CONFIGS: dict[str, type[_SubConfig]] = {
    "vision": VisionConfig,
    "connector": ConnectorConfig,
    "description_projector": DescriptionProjectorConfig,
    "pixel_decoder": PixelDecoderConfig,
    "mask_decoder": MaskDecoderConfig,
    "loss": LossConfig,
    "lora": LoraConfig,
}


def build_text_config(text_config: PretrainedConfig | dict[str, Any] | None) -> PretrainedConfig:
    """Any HF causal-LM config (Phi, LLaMA, ...) from a config object or a dict with `model_type`."""
    if text_config is None:
        text_config = dict(PHI_1_5_TEXT_CONFIG)
    if isinstance(text_config, PretrainedConfig):
        return text_config
    data = dict(text_config)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError("text_config needs a 'model_type' (e.g. 'phi' or 'llama')")
    return AutoConfig.for_model(model_type, **data)


class SegEarthR1Config(PretrainedConfig):
    """Configuration of `SegEarthR1ForReasoningSegmentation`.

    Args:
        text_config: the LLM's HF config (or dict with `model_type`); default Phi-1.5.
        image_size: square letterbox size S (reference 1024). The connector's LayerNorm shapes and
            the number of visual tokens are derived from it.
        vision/connector/description_projector/pixel_decoder/mask_decoder/loss/lora: sub-config dicts
            (unknown keys are errors).
        seg_token_id / pad_token_id: ids of `[SEG]` and `[PAD]` after the tokenizer set-up (DESIGN §2.4).
        attn_implementation: attention backend requested for the LLM (`sdpa` default; never eager
            with attention maps as the reference did).
        compile: torch.compile the encoder, connector and decoders (`model.compile: true` in a run config;
            off by default: compilation takes minutes and needs a C++ compiler on CPU).
    """

    model_type = "segearthr1"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: PretrainedConfig | dict[str, Any] | None = None,
        image_size: int = 1024,
        vision: dict[str, Any] | None = None,
        connector: dict[str, Any] | None = None,
        description_projector: dict[str, Any] | None = None,
        pixel_decoder: dict[str, Any] | None = None,
        mask_decoder: dict[str, Any] | None = None,
        loss: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        seg_token_id: int | None = None,
        pad_token_id: int | None = None,
        llm_attn_implementation: str = "sdpa",
        compile: bool = False,
        **kwargs,
    ):
        self.text_config = build_text_config(text_config)
        self.image_size = int(image_size)
        given = {"vision": vision, "connector": connector, "description_projector": description_projector,
                 "pixel_decoder": pixel_decoder, "mask_decoder": mask_decoder, "loss": loss, "lora": lora}
        for name, cls in SUB_CONFIGS.items():
            value = given[name]
            setattr(self, name, value if isinstance(value, cls) else cls.from_dict(value, where=f"{name}."))
        self.seg_token_id = seg_token_id
        self.llm_attn_implementation = llm_attn_implementation
        self.compile = bool(compile)
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self._validate()

    # ----------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        stride = self.vision.patch_size * 8
        if self.image_size < stride:
            raise ValueError(f"image_size={self.image_size} is smaller than the encoder's total stride {stride}")
        _check_choice("llm_attn_implementation", self.llm_attn_implementation, ("sdpa", "eager", "flash_attention_2"))
        if self.connector.kind == "identity" and self.vision.out_channels[-1] != self.text_config.hidden_size:
            raise ValueError(
                f"connector.kind='identity' needs res5 channels ({self.vision.out_channels[-1]}) == LLM hidden "
                f"size ({self.text_config.hidden_size}); use 'sparse_conv', 'linear' or 'mlp2x_gelu'")
        pd = self.pixel_decoder
        n_levels = len(pd.transformer_in_features)
        if n_levels > 4:
            raise ValueError(f"pixel_decoder.transformer_in_features has {n_levels} levels; the encoder has 4")

    @property
    def encoder_channels(self) -> list[int]:
        return self.vision.out_channels

    @property
    def feature_sizes(self) -> list[int]:
        return swin_feature_sizes(self.image_size, self.vision.patch_size)

    @property
    def llm_hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def keep_seg_token(self) -> bool:
        """`<seg>` stays in the LLM input only for the learned-query ablation (reference `use_seg_query`)."""
        return self.mask_decoder.query == "learned"

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in SUB_CONFIGS:
            value = getattr(self, name)
            out[name] = value.to_dict() if isinstance(value, _SubConfig) else value
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        # Always save the full config: a checkpoint must not depend on this version's defaults.
        return self.to_dict()
