"""SegEarth-R1: image + instruction -> binary mask (DESIGN.md §2).

Data flow for a batch (shapes for the reference 1024² configuration):
    images [B,3,S,S] --Swin (once)--> res2..res5 (strides 4..32)
    res5 --connector--> visual tokens [B,64,H]
    input_ids with sentinels --merge--> inputs_embeds [B,L',H] --LLM--> last hidden states [B,L',H]
    hidden states @ description positions + res5 --description projector--> query [B,1,256]
    res2..res5 --pixel decoder--> mask_features [B,256,S/4,S/4] + 3 multi-scale maps
    query + maps --masked-attention decoder--> mask logits [B,1,S/4,S/4] (+ 9 auxiliary)
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput

from ..configuration import SegEarthR1Config
from ..losses import MaskCriterion, reduce_num_masks
from ..perf.cpu_low_precision import cpu_products_in_fp32_for
from ..processing import DATASET_TYPES, IGNORE_LABEL_ID, REASON_SEG, REFER_SEG
from .connector import build_connector
from .description_projector import DescriptionProjector
from .input_merge import merge_multimodal_inputs
from .lora import apply_lora, merge_lora
from .mask_decoder import MaskDecoder
from .pixel_decoder import MSDeformAttnPixelDecoder
from .vision_encoder import SwinEncoder

logger = logging.getLogger(__name__)



@dataclass
class SegEarthR1Output(ModelOutput):
    """Training forward output. `loss` = loss_llm + loss_mask + loss_dice (+ loss_seg_class in the
    learned-query ablation); the parts are logged under these fixed names."""

    loss: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    loss_dice: torch.Tensor | None = None
    loss_llm: torch.Tensor | None = None
    loss_seg_class: torch.Tensor | None = None
    pred_masks: torch.Tensor | None = None  # [B,1,S/4,S/4] final mask logits


@dataclass
class SegEarthR1Prediction(ModelOutput):
    """Inference output at the model's input size S (letterboxed)."""

    mask_logits: torch.Tensor | None = None  # [B,S,S] float, before thresholding
    masks: torch.Tensor | None = None  # [B,S,S] bool, mask_logits > 0


class SegEarthR1PreTrainedModel(PreTrainedModel):
    config_class = SegEarthR1Config
    base_model_prefix = "segearthr1"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SwinBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        # Every sub-module initialises itself in its constructor (the reference inits: Mask2Former's
        # xavier / c2-xavier, the LLM's own _init_weights); the wrapper must not overwrite them.
        return


class SegEarthR1ForReasoningSegmentation(SegEarthR1PreTrainedModel):
    """The full model. `forward(**batch)` -> losses; `predict(**batch)` -> masks.

    Batch keys (DESIGN.md §2.9; extra keys are ignored):
        input_ids [B,L] long, with sentinels IMAGE -200, SEG -201, REFER -204, ANSWER -205, right-padded.
        attention_mask [B,L] bool (input_ids != pad).
        labels [B,L] long (IGNORE -100 on instruction and padding); needed for the LLM loss.
        images [B,3,S,S] float, letterboxed and normalised.
        masks [B,1,S,S] uint8 {0,1} ground truth (forward only).
        token_refer_id list of B 1-D long tensors: ids of " " + instruction, then [SEG].
        refer_embedding_indices [B,L] (1 at <refer>; informational, the sentinel id is authoritative).
        token_answer_id list of B 1-D long tensors (reason_seg only): answer ids, then [SEG].
        answer_embedding_indices [B,L] (reason_seg only; informational).
        dataset_type list of B identical strings, "refer_seg" or "reason_seg".
    """

    def __init__(self, config: SegEarthR1Config):
        super().__init__(config)
        # Each module reads its sizes from the config (the one place of defaults and rules).
        self.vision_encoder = SwinEncoder.from_config(config)
        self.connector = build_connector(config)
        self.language_model = self._build_language_model(config)
        if config.lora.enabled:
            self.language_model = apply_lora(self.language_model, config.lora)
        self.description_projector = DescriptionProjector.from_config(config)
        self.pixel_decoder = MSDeformAttnPixelDecoder.from_config(config)
        self.mask_decoder = MaskDecoder.from_config(config)
        self.criterion = MaskCriterion.from_config(config)
        if config.vision.frozen:
            self.vision_encoder.requires_grad_(False)
        # Optional per-stage instrumentation (segearthr1.perf.StageTimer): called with each stage's
        # output, returns it (possibly wrapped for backward timing). None costs nothing.
        self.stage_observer: Callable[[str, object], object] | None = None
        self.post_init()
        if config.compile:
            self.compile_modules()

    def compile_modules(self) -> None:
        """torch.compile the encoder and both decoders in place (parameter names unchanged). The LLM is
        left to HF (dynamic sequence lengths recompile too often to pay off)."""
        for module in (self.vision_encoder, self.connector, self.pixel_decoder, self.mask_decoder):
            module.compile(dynamic=False)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _build_language_model(config: SegEarthR1Config) -> PreTrainedModel:
        """Any HF causal LM from its config, with SDPA attention. Phi's lm_head is rebuilt without
        bias, as in the released checkpoints (DESIGN.md §3)."""
        text_config = config.text_config
        text_config._attn_implementation = config.llm_attn_implementation
        model = AutoModelForCausalLM.from_config(text_config, attn_implementation=config.llm_attn_implementation)
        head = model.get_output_embeddings()
        if head.bias is not None:
            new_head = nn.Linear(head.in_features, head.out_features, bias=False, device=head.weight.device,
                                 dtype=head.weight.dtype)
            with torch.no_grad():
                new_head.weight.copy_(head.weight)
            model.set_output_embeddings(new_head)
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @property
    def point_sampler(self) -> Callable | None:
        """Hook for the mask loss's point selection: a callable `(logits [N,1,h,w]) -> coords [N,P,2]`
        in [0,1] (x, y). `None` = the reference's uncertainty-based importance sampling. Tests and parity
        checks set it to pin the points (see `MaskCriterion.sample_points`)."""
        return self.criterion.point_sampler

    @point_sampler.setter
    def point_sampler(self, fn: Callable | None) -> None:
        self.criterion.point_sampler = fn

    # ------------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        vc = self.config.vision
        if mode and vc.frozen and not vc.train_mode_when_frozen:
            self.vision_encoder.eval()
        return self

    def encode_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """One pass of the vision encoder per step (the reference runs it twice). Without gradients
        when frozen; drop-path still follows the module's train/eval mode (DESIGN §8)."""
        frozen = not any(p.requires_grad for p in self.vision_encoder.parameters())
        ctx = torch.no_grad() if frozen else contextlib.nullcontext()
        with ctx:
            return self.vision_encoder(images.to(self._vision_dtype()))

    def _vision_dtype(self) -> torch.dtype:
        return self.vision_encoder.patch_embed.proj.weight.dtype

    def _stage(self, name: str, value):
        """Hand a stage's output to the observer (benchmarks); identity when none is set."""
        return value if self.stage_observer is None else self.stage_observer(name, value)

    def _run(self, input_ids, attention_mask, images, token_refer_id, labels=None, token_answer_id=None):
        features = self._stage("vision_encoder", self.encode_images(images))
        res5 = features["res5"]
        embed = self.get_input_embeddings()
        visual = self._stage("connector", self.connector(res5.to(self.connector_dtype)).to(embed.weight.dtype))
        merged = merge_multimodal_inputs(
            input_ids, attention_mask, labels, embed, visual, token_refer_id, token_answer_id,
            seg_token_id=self.config.seg_token_id, keep_seg_token=self.config.keep_seg_token)
        base = self.language_model.get_decoder()
        hidden = base(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask.long(),
                      use_cache=False, return_dict=True).last_hidden_state
        hidden = self._stage("llm", hidden)
        query = self._stage("description_projector",
                            self.description_projector(hidden, merged.description_mask, res5.to(hidden.dtype)))
        decoder_dtype = self.pixel_decoder.mask_features.weight.dtype
        pixel = self._stage("pixel_decoder", self.pixel_decoder.forward_features(
            {k: v.to(decoder_dtype) for k, v in features.items()}))
        decoded = self._stage("mask_decoder", self.mask_decoder(
            pixel.multi_scale_features, pixel.mask_features, query.to(decoder_dtype)))
        return merged, hidden, decoded

    @property
    def connector_dtype(self) -> torch.dtype:
        """The connector's dtype (the identity connector has no parameters: use the LLM's)."""
        param = next(self.connector.parameters(), None)
        return (param if param is not None else self.get_input_embeddings().weight).dtype

    def _lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross entropy, mean over target tokens; logits only where a target exists."""
        shift_labels = labels[:, 1:]
        keep = shift_labels != IGNORE_LABEL_ID
        if not keep.any():
            return hidden.sum() * 0.0
        logits = self.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), shift_labels[keep])

    @staticmethod
    def _dataset_type(dataset_type: Sequence[str] | str | None) -> str:
        if dataset_type is None:
            return REFER_SEG
        kinds = {dataset_type} if isinstance(dataset_type, str) else set(dataset_type)
        if len(kinds) != 1 or not kinds <= set(DATASET_TYPES):
            raise ValueError(f"dataset_type={sorted(kinds)}: a batch must hold exactly one of {list(DATASET_TYPES)}")
        return kinds.pop()

    def forward(self, input_ids, attention_mask, images, masks, token_refer_id, labels=None,
                token_answer_id=None, dataset_type=None, **unused) -> SegEarthR1Output:
        kind = self._dataset_type(dataset_type)
        if kind == REFER_SEG:
            token_answer_id = None
        merged, hidden, decoded = self._run(input_ids, attention_mask, images, token_refer_id,
                                            labels=labels, token_answer_id=token_answer_id)
        num_masks = reduce_num_masks(input_ids.shape[0], input_ids.device)
        aux = decoded.aux_pred_masks if self.config.loss.deep_supervision else []
        losses = self.criterion(decoded.pred_masks.float(), [a.float() for a in aux], masks, num_masks,
                                **self._learned_query_kwargs(decoded))
        if kind == REASON_SEG and labels is not None:
            loss_llm = self._lm_loss(hidden, merged.labels) * self.config.loss.llm_weight
        else:
            loss_llm = hidden.new_zeros((), dtype=torch.float32)
        loss = loss_llm + losses["loss_mask"] + losses["loss_dice"]
        seg_class = losses.get("loss_seg_class")
        if seg_class is not None:
            loss = loss + seg_class
        return SegEarthR1Output(loss=loss, loss_mask=losses["loss_mask"].detach(), loss_dice=losses["loss_dice"].detach(),
                                loss_llm=loss_llm.detach(), loss_seg_class=None if seg_class is None else seg_class.detach(),
                                pred_masks=decoded.pred_masks)

    def _learned_query_kwargs(self, decoded) -> dict:
        if self.config.mask_decoder.query != "learned":
            return {}
        return {"pred_seg_logits": decoded.pred_seg_logits, "aux_pred_seg_logits": decoded.aux_pred_seg_logits}

    def _final_logits(self, decoded) -> torch.Tensor:
        """[B,1,h,w] logits of the answer mask (learned-query ablation: the best-scoring query)."""
        if self.config.mask_decoder.query != "learned":
            return decoded.pred_masks
        best = decoded.pred_seg_logits.argmax(dim=1)
        return decoded.pred_masks[torch.arange(best.numel(), device=best.device), best][:, None]

    @torch.no_grad()
    def predict(self, input_ids, attention_mask, images, token_refer_id, token_answer_id=None,
                dataset_type=None, **unused) -> SegEarthR1Prediction:
        """Mask logits upsampled (bilinear, align_corners=False) to the input size S, and `logits > 0`.
        bf16/fp16 on a CPU without native kernels: matrix products in fp32 (perf/cpu_low_precision.py; not
        with `compile`: a Python dispatch mode and compiled graphs are not mixed)."""
        kind = self._dataset_type(dataset_type)
        if kind == REFER_SEG:
            token_answer_id = None
        with contextlib.nullcontext() if self.config.compile else cpu_products_in_fp32_for(self):
            _, _, decoded = self._run(input_ids, attention_mask, images, token_refer_id,
                                      token_answer_id=token_answer_id)
        logits = self._final_logits(decoded).float()
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return SegEarthR1Prediction(mask_logits=logits, masks=logits > 0)

    def merge_lora(self) -> int:
        """Fold LoRA adapters into the LLM weights (for export); the config then says LoRA is off."""
        merged = merge_lora(self.language_model)
        self.config.lora.enabled = False
        return merged

    # ------------------------------------------------------------------------------------------
    def trainable_parameter_report(self) -> dict[str, tuple[int, int]]:
        """{module: (trainable, frozen)} parameter counts, for the start-up log."""
        report = {}
        for name, module in self.named_children():
            params = list(module.parameters())
            trainable = sum(p.numel() for p in params if p.requires_grad)
            report[name] = (trainable, sum(p.numel() for p in params) - trainable)
        return report
