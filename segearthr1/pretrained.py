"""Loading and saving models from local directories (nothing is downloaded).

- `load_pretrained(model_dir)`: our HF-style checkpoints *and* reference release directories
  (`model_type` `llava_phi`, reference parameter names, + the mask-config YAML).
- `save_pretrained(model, tokenizer, out_dir)`: config.json + safetensors + tokenizer files.
- `build_for_training(...)`: a fresh model initialised from a local Phi (or LLaMA) HF directory and
  a Mask2Former `.pkl`, with the tokenizer set up (`[PAD]`, `[SEG]`) and embeddings resized.
"""
from __future__ import annotations

import contextlib
import json
import logging
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .checkpoint import (ConversionReport, convert_mask2former_state_dict, convert_to_upstream_state_dict,
                         convert_upstream_state_dict, llm_keys_from_hf, verify_keys)
from .configuration import SegEarthR1Config
from .checkpoint_files import check_file, check_json
from .errors import CheckpointCorruptedError, CheckpointNotFoundError
from .modeling.segearthr1 import SegEarthR1ForReasoningSegmentation
from .processing import PAD_TOKEN, SEG_TOKEN, setup_tokenizer
from .reference_config import config_from_reference, is_reference_config, load_mask_config

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
MODEL_DIR_LAYOUT = ("expected a directory with config.json, model.safetensors (or sharded *.safetensors + "
                    "model.safetensors.index.json, or pytorch_model.bin) and tokenizer files "
                    "(tokenizer_config.json + vocab.json/merges.txt or tokenizer.json)")


# ------------------------------------------------------------------------------------------------
# file helpers

def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{what} directory {path} does not exist; {MODEL_DIR_LAYOUT}")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} not found; {MODEL_DIR_LAYOUT}")
    return check_json(path)


def _weight_paths(model_dir: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(read_json(path)["weight_map"].values()))
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise CheckpointNotFoundError(f"{path} lists shards that are missing: {missing}")
            return [model_dir / s for s in shards]
        return [path]
    raise CheckpointNotFoundError(f"no weights in {model_dir}: looked for {list(WEIGHT_FILES)}; {MODEL_DIR_LAYOUT}")


def load_state_dict_files(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors or torch checkpoint, on CPU."""
    state: dict[str, torch.Tensor] = {}
    for path in _weight_paths(model_dir):
        check_file(path)  # a truncated file is named here, not as a bare SafetensorError
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state.update(load_file(str(path), device="cpu"))
            except SafetensorError as err:
                raise CheckpointCorruptedError(f"{path} is damaged and cannot be read: {err}") from err
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    logger.info("read %d tensors from %s", len(state), model_dir)
    return state


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Skip random initialisation while building a model whose every parameter is loaded next
    (the strict load guarantees nothing is left uninitialised). Saves minutes at full size."""
    names = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "constant_", "zeros_", "ones_", "orthogonal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`/None: bf16 on CUDA, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r} is not supported; choose auto, {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _DropForeignConfigWarning(logging.Filter):
    """AutoTokenizer reads config.json to guess the tokenizer class; for a model type transformers does
    not know (ours, `segearthr1`, or the reference `llava_phi`) it falls back to a bare config and warns
    "model of type `segearthr1` to instantiate a model of type ``" on every load. The tokenizer comes
    from tokenizer_config.json either way, so that one message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "to instantiate a model of type ``" not in record.getMessage()


def load_tokenizer(path: Path):
    """The tokenizer saved beside a checkpoint (local files only)."""
    from transformers import AutoTokenizer

    config_logger = logging.getLogger("transformers.configuration_utils")
    quiet = _DropForeignConfigWarning()
    config_logger.addFilter(quiet)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointNotFoundError(f"could not load a tokenizer from {path}: {err}; {MODEL_DIR_LAYOUT}") from err
    finally:
        config_logger.removeFilter(quiet)


def _token_ids(tokenizer) -> dict[str, int]:
    vocab = tokenizer.get_vocab()
    if SEG_TOKEN not in vocab:
        raise ValueError(f"tokenizer has no {SEG_TOKEN} token; a SegEarth-R1 checkpoint's tokenizer must have it "
                         "(set it up with segearthr1.processing.setup_tokenizer)")
    return {"seg_token_id": vocab[SEG_TOKEN], "pad_token_id": tokenizer.pad_token_id}


# ------------------------------------------------------------------------------------------------
# load / save

def load_pretrained(model_dir: str | Path, mask_config: str | Path | None = None, device: str | torch.device | None = "cpu",
                    dtype: str | torch.dtype | None = None, image_size: int | None = None):
    """Load (model, tokenizer) from our checkpoint directory or a reference release directory.

    Args:
        model_dir: directory with config.json, weights and tokenizer files.
        mask_config: the reference mask-config YAML (only for reference releases; its `_BASE_` chain
            is followed). Defaults to the reference Swin-B values when omitted.
        device: "cpu", "cuda", "auto" or a torch.device.
        dtype: "auto" (bf16 on CUDA, fp32 otherwise), "fp32", "bf16", "fp16" or a torch.dtype.
        image_size: override the letterbox size of a reference release (default 1024).
    Loading is strict: missing keys are an error; unexpected keys only from the documented drop list.
    """
    model_dir = Path(model_dir)
    _require_dir(model_dir, "model")
    raw = read_json(model_dir / "config.json")
    tokenizer = load_tokenizer(model_dir)
    ids = _token_ids(tokenizer)
    reference = is_reference_config(raw)
    if reference:
        mask_cfg = load_mask_config(mask_config) if mask_config is not None else None
        config = config_from_reference(raw, mask_cfg, image_size=image_size or 1024, **ids)
        logger.info("%s is a reference release (model_type %s); mask config: %s", model_dir, raw.get("model_type"),
                    mask_config or "reference defaults")
    else:
        if raw.get("model_type") != SegEarthR1Config.model_type:
            raise CheckpointNotFoundError(
                f"{model_dir} is not a SegEarth-R1 checkpoint: its config.json has model_type "
                f"{raw.get('model_type')!r}, expected {SegEarthR1Config.model_type!r} (ours) or a reference release "
                "('llava_phi'); point --model_path at a directory written by segearthr1 train or a released model")
        if mask_config is not None:
            logger.warning("--mask_config is ignored for %s: our checkpoints carry the full config", model_dir)
        config = SegEarthR1Config.from_dict(raw)
        if image_size is not None and image_size != config.image_size:
            raise ValueError(f"image_size={image_size} differs from the checkpoint's {config.image_size}; the "
                             "connector's LayerNorm shapes depend on it")
    with skip_init():
        model = SegEarthR1ForReasoningSegmentation(config)
    state = load_state_dict_files(model_dir)
    model_state = model.state_dict()
    if reference:
        state, report = convert_upstream_state_dict(state, config.text_config.num_attention_heads)
        logger.info("converted reference weights: %s", report.summary())
    verify_keys(state, model_state.keys(), {k: tuple(v.shape) for k, v in model_state.items()})
    model.load_state_dict(state, strict=True)
    device = resolve_device(device)
    model.to(device=device, dtype=resolve_dtype(dtype, device))
    model.eval()
    logger.info("loaded SegEarth-R1 from %s (%s, %s)", model_dir, device, next(model.parameters()).dtype)
    return model, tokenizer


def save_pretrained(model: SegEarthR1ForReasoningSegmentation, tokenizer, out_dir: str | Path,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + model.safetensors + tokenizer files (+ optional text files, e.g. the
    resolved run config) to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    for name, text in (extra_files or {}).items():
        (out_dir / name).write_text(text, encoding="utf-8")
    logger.info("saved model and tokenizer to %s", out_dir)
    return out_dir


def export_reference_release(model: SegEarthR1ForReasoningSegmentation, tokenizer, out_dir: str | Path) -> Path:
    """Write a checkpoint in the reference release layout (llava_phi config.json, reference parameter
    names with fused Phi attention). The mask-decoder dimensions are not in it: pass the matching
    mask-config YAML when loading, as with the released models."""
    from safetensors.torch import save_file

    config = model.config
    if config.text_config.model_type != "phi":
        raise ValueError(f"reference export supports Phi LLMs only, not {config.text_config.model_type!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    upstream = convert_to_upstream_state_dict(state, config.text_config.num_attention_heads)
    upstream["seg_query"] = torch.zeros(100, config.llm_hidden_size, dtype=next(iter(state.values())).dtype)
    save_file(upstream, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    text = config.text_config.to_dict()
    release = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "partial_rotary_factor", "layer_norm_eps", "hidden_act",
                                    "max_position_embeddings", "rope_theta", "qk_layernorm", "resid_pdrop",
                                    "embd_pdrop", "attention_dropout", "initializer_range") if k in text}
    connector = {"sparse_conv": "SparseConv_1"}.get(config.connector.kind, config.connector.kind)
    release.update({"model_type": "llava_phi", "architectures": ["SegEarthR1"], "mm_projector_type": connector,
                    "tie_word_embeddings": False, "projector_outdim": config.llm_hidden_size,
                    "transformers_version": "4.36.2"})
    (out_dir / "config.json").write_text(json.dumps(release, indent=2), encoding="utf-8")
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def write_mask_config_yaml(config: SegEarthR1Config, path: str | Path) -> Path:
    """A reference-style mask-config YAML holding this config's encoder/decoder dimensions."""
    import yaml

    v, pd, md, lc = config.vision, config.pixel_decoder, config.mask_decoder, config.loss
    data = {"MODEL": {
        "SWIN": {"EMBED_DIM": v.embed_dim, "DEPTHS": list(v.depths), "NUM_HEADS": list(v.num_heads),
                 "WINDOW_SIZE": v.window_size, "MLP_RATIO": v.mlp_ratio, "DROP_PATH_RATE": v.drop_path_rate},
        "SEM_SEG_HEAD": {"CONVS_DIM": pd.conv_dim, "MASK_DIM": pd.mask_dim,
                         "TRANSFORMER_ENC_LAYERS": pd.num_encoder_layers, "COMMON_STRIDE": pd.common_stride,
                         "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": list(pd.transformer_in_features)},
        "MASK_FORMER": {"HIDDEN_DIM": md.hidden_dim, "NUM_OBJECT_QUERIES": md.num_queries, "NHEADS": md.num_heads,
                        "DIM_FEEDFORWARD": md.dim_feedforward, "DEC_LAYERS": md.num_layers + 1,
                        "PRE_NORM": md.pre_norm, "ENFORCE_INPUT_PROJ": md.enforce_input_project,
                        "DROPOUT": pd.dropout, "TRAIN_NUM_POINTS": lc.num_points,
                        "OVERSAMPLE_RATIO": lc.oversample_ratio, "IMPORTANCE_SAMPLE_RATIO": lc.importance_sample_ratio,
                        "CLASS_WEIGHT": lc.class_weight, "MASK_WEIGHT": lc.mask_weight, "DICE_WEIGHT": lc.dice_weight}}}
    if pd.num_heads != md.num_heads:
        raise ValueError("the reference mask config has one NHEADS for both decoders; pixel_decoder.num_heads "
                         f"({pd.num_heads}) != mask_decoder.num_heads ({md.num_heads}) cannot be exported")
    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# initialisation for training

@torch.no_grad()
def resize_token_embeddings(model: SegEarthR1ForReasoningSegmentation, new_size: int) -> None:
    """Resize input and output embeddings to `new_size` rows like HF `resize_token_embeddings` did in
    the reference: the first min(old, new) rows are kept (a shrink truncates), rows beyond the old count
    are drawn from N(0, initializer_range). The output head stays bias-free."""
    lm = model.language_model
    old_in, old_out = lm.get_input_embeddings(), lm.get_output_embeddings()
    old_rows = old_in.weight.shape[0]
    if new_size == old_rows:
        return
    std = getattr(model.config.text_config, "initializer_range", 0.02)
    keep = min(old_rows, new_size)
    new_in = nn.Embedding(new_size, old_in.weight.shape[1], dtype=old_in.weight.dtype, device=old_in.weight.device)
    new_out = nn.Linear(old_out.in_features, new_size, bias=False, dtype=old_out.weight.dtype,
                        device=old_out.weight.device)
    for new, old in ((new_in, old_in), (new_out, old_out)):
        new.weight.normal_(0.0, std)
        new.weight[:keep] = old.weight[:keep]
    lm.set_input_embeddings(new_in)
    lm.set_output_embeddings(new_out)
    model.config.text_config.vocab_size = new_size


@torch.no_grad()
def mean_init_last_rows(model: SegEarthR1ForReasoningSegmentation, num_rows: int) -> None:
    """Set the last `num_rows` input/output embedding rows to the mean of the rows before them
    (the reference's rule for an added `[PAD]`)."""
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        weight[-num_rows:] = weight[:-num_rows].mean(0, keepdim=True)


def setup_tokenizer_and_embeddings(model: SegEarthR1ForReasoningSegmentation, tokenizer) -> None:
    """The reference training set-up, in its order: add `[PAD]` if the tokenizer has no pad token,
    resize to len(tokenizer) and mean-initialise its rows; add `[SEG]` and resize again. Records the
    ids in the config."""
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        resize_token_embeddings(model, len(tokenizer))
        mean_init_last_rows(model, 1)
    setup_tokenizer(tokenizer)  # adds [SEG] (and nothing else now that a pad token exists)
    resize_token_embeddings(model, len(tokenizer))
    vocab = tokenizer.get_vocab()
    model.config.seg_token_id = vocab[SEG_TOKEN]
    model.config.pad_token_id = tokenizer.pad_token_id


def load_mask2former_weights(model: SegEarthR1ForReasoningSegmentation, pkl_path: str | Path) -> list[str]:
    """Initialise encoder, pixel decoder and transformer decoder from a Mask2Former `.pkl`
    (a pickled dict whose `model` entry maps names to numpy arrays). Returns the keys left at init."""
    pkl_path = Path(pkl_path)
    if not pkl_path.is_file():
        raise CheckpointNotFoundError(
            f"Mask2Former checkpoint {pkl_path} not found; expected pretrained/Swin_base/model_final_54b88a.pkl "
            "(Mask2Former Swin-B COCO panoptic), see pretrained/README.md")
    with open(pkl_path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    weights = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"{pkl_path} is not a Mask2Former checkpoint: expected a dict with a 'model' mapping")
    model_state = model.state_dict()
    state, left_at_init = convert_mask2former_state_dict(weights, model_state.keys())
    verify_keys(state, [k for k in model_state if k in state], {k: tuple(v.shape) for k, v in model_state.items()})
    with torch.no_grad():
        for key, value in state.items():
            model_state[key].copy_(value.to(model_state[key].dtype))
    logger.info("initialised %d encoder/decoder tensors from %s; %d left at init: %s", len(state), pkl_path,
                len(left_at_init), left_at_init)
    return left_at_init


def load_llm_weights(model: SegEarthR1ForReasoningSegmentation, llm_dir: str | Path) -> ConversionReport:
    """Copy a local HF causal-LM checkpoint (Phi fused-4.36 or split layout, or LLaMA) into the model."""
    llm_dir = Path(llm_dir)
    _require_dir(llm_dir, "LLM")
    report = ConversionReport()
    state = llm_keys_from_hf(load_state_dict_files(llm_dir), model.config.text_config.num_attention_heads, report)
    model_state = model.state_dict()
    llm_keys = [k for k in model_state if k.startswith("language_model.")]
    verify_keys(state, llm_keys, {k: tuple(v.shape) for k, v in model_state.items()})
    with torch.no_grad():
        for key, value in state.items():
            model_state[key].copy_(value.to(model_state[key].dtype))
    logger.info("initialised the LLM from %s (%d tensors; %d fused q|k|v split; dropped %s)", llm_dir, len(state),
                len(report.fused_qkv_split), report.dropped)
    return report


def build_for_training(config: SegEarthR1Config, llm_dir: str | Path | None, mask2former_pkl: str | Path | None,
                       tokenizer_dir: str | Path | None = None):
    """A model ready to train: LLM config + weights from `llm_dir` (if given), encoder/decoders from
    `mask2former_pkl` (if given), tokenizer set up with `[PAD]`/`[SEG]`. Returns (model, tokenizer)."""
    tokenizer_dir = tokenizer_dir or llm_dir
    if tokenizer_dir is None:
        raise ValueError("build_for_training needs llm_dir or tokenizer_dir for the tokenizer")
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    if llm_dir is not None:
        text = read_json(Path(llm_dir) / "config.json")
        text.setdefault("model_type", "phi")
        text_config = {k: v for k, v in text.items() if not k.startswith("_") and k not in
                       ("architectures", "transformers_version", "torch_dtype", "auto_map", "dtype")}
        config = SegEarthR1Config.from_dict({**config.to_dict(), "text_config": text_config})
    model = SegEarthR1ForReasoningSegmentation(config)
    if llm_dir is not None:
        load_llm_weights(model, llm_dir)
    if mask2former_pkl is not None:
        load_mask2former_weights(model, mask2former_pkl)
    setup_tokenizer_and_embeddings(model, tokenizer)
    return model, tokenizer
