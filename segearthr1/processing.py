"""Prompt template, special tokens and text encoding of SegEarth-R1 samples (DESIGN.md §2.4).

The reference renders one fixed conversation per dataset (the instruction itself is *not* in the
prompt: a ``<refer>`` placeholder stands for it) and feeds the instruction, the answer and the
``[SEG]`` token as separate "payloads" that the model embeds at the placeholder positions. Every
string and id here is pinned by ``tests/fixtures/reference/prompts.pt``; change nothing without
re-checking that fixture.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# --- sentinel ids (placeholders in input_ids) and the label ignore value --------------------------
IGNORE_LABEL_ID = -100  # token label the LM loss skips (torch cross_entropy's ignore_index); masks use 255
IMAGE_TOKEN_INDEX = -200
SEG_TOKEN_INDEX = -201
REFER_TOKEN_INDEX = -204
ANSWER_TOKEN_INDEX = -205

IMAGE_PLACEHOLDER = "<image>"
SEG_PLACEHOLDER = "<seg>"
REFER_PLACEHOLDER = "<refer>"
ANSWER_PLACEHOLDER = "<answer>"
PLACEHOLDER_IDS: dict[str, int] = {
    IMAGE_PLACEHOLDER: IMAGE_TOKEN_INDEX,
    SEG_PLACEHOLDER: SEG_TOKEN_INDEX,
    REFER_PLACEHOLDER: REFER_TOKEN_INDEX,
    ANSWER_PLACEHOLDER: ANSWER_TOKEN_INDEX,
}
_PLACEHOLDER_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDER_IDS) + ")")

# --- tokens added to the tokenizer at training start -----------------------------------------------
PAD_TOKEN = "[PAD]"
SEG_TOKEN = "[SEG]"

# --- the "llava_phi" conversation template (LLaMA-2 layout with Phi's end-of-text separator) -------
DEFAULT_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
DEFAULT_SEPARATOR = "<|endoftext|>"  # both sep and sep2 of the template
INSTRUCTION_END = "[/INST] "  # what the label masking splits each round on

REFERRING_USER = (
    "This is an image <image>, Please doing Referring Segmentation according to the following "
    "instruction:\n<refer>"
)
REASONING_USER = (
    "This is an image <image>, Please doing Reasoning Segmentation according to the following "
    "instruction:\n<refer>"
)
REFERRING_ASSISTANT = "\nSure. It is <seg>. "
REFERRING_ASSISTANT_SHORT = "\nSure."  # RRSIS-D evaluation only (reference quirk)
REASONING_ASSISTANT = "Sure, It is <seg>. \n<answer>."
NO_TARGET_ANSWER = "There is no target object in the image."  # EarthReason answer when the list is empty

# --- dataset types: the two tasks, and the prompt templates a dataset declares (data/registry.py) ----
REFER_SEG = "refer_seg"
REASON_SEG = "reason_seg"
DATASET_TYPES = (REASON_SEG, REFER_SEG)


@dataclass(frozen=True)
class PromptTemplate:
    """User turn, assistant turn and dataset_type of one (dataset, train/eval) combination."""

    user: str
    assistant: str
    dataset_type: str

    @property
    def has_answer(self) -> bool:
        return ANSWER_PLACEHOLDER in self.assistant


REFERRING_PROMPT = PromptTemplate(REFERRING_USER, REFERRING_ASSISTANT, REFER_SEG)
REFERRING_SHORT_PROMPT = PromptTemplate(REFERRING_USER, REFERRING_ASSISTANT_SHORT, REFER_SEG)
REASONING_PROMPT = PromptTemplate(REASONING_USER, REASONING_ASSISTANT, REASON_SEG)
# Prompt used for a free (image, query) pair at inference: the evaluation prompt of the reference
# dataset of each task (EarthReason for reasoning, RefSegRS for referring).
TASK_PROMPTS: dict[str, PromptTemplate] = {"reasoning": REASONING_PROMPT, "referring": REFERRING_PROMPT}
TASK_OF_TYPE = {REASON_SEG: "reasoning", REFER_SEG: "referring"}


def render_conversation(user: str, assistant: str, system: str = DEFAULT_SYSTEM,
                        separator: str = DEFAULT_SEPARATOR) -> str:
    """One LLaMA-2-style exchange with the leading separator stripped (no bos, nothing before [INST])."""
    return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} {separator}"


def build_conversation(template: PromptTemplate) -> str:
    """The full prompt string of `template`; identical for all samples of a dataset."""
    return render_conversation(template.user, template.assistant)


# --- tokenizer set-up --------------------------------------------------------------------------------
def setup_tokenizer(tokenizer) -> list[str]:
    """Add `[PAD]` (special, made the pad token) if there is no pad token, then `[SEG]` (ordinary).

    Returns the tokens added (empty when already set up). The model must resize its embeddings to
    `len(tokenizer)` afterwards (and initialise new rows, DESIGN §2.4).
    """
    added: list[str] = []
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(PAD_TOKEN)
    if SEG_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([SEG_TOKEN], special_tokens=False)
        added.append(SEG_TOKEN)
    if added:
        logger.info("tokenizer set-up added %s (pad id %s, vocabulary now %d)", added,
                    tokenizer.pad_token_id, len(tokenizer))
    return added


def seg_token_id(tokenizer) -> int:
    """Id of the `[SEG]` token (must be one token: call `setup_tokenizer` first)."""
    ids = tokenizer.encode(SEG_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"the tokenizer encodes {SEG_TOKEN!r} as {ids}, expected one added token; run "
            f"segearthr1.processing.setup_tokenizer(tokenizer) and resize the model embeddings"
        )
    return int(ids[0])


# --- tokenisation --------------------------------------------------------------------------------------
def tokenize_with_placeholders(text: str, tokenizer) -> list[int]:
    """Encode `text`, each placeholder becoming its sentinel id; text chunks are encoded separately."""
    ids: list[int] = []
    for chunk in _PLACEHOLDER_SPLIT.split(text):
        if chunk in PLACEHOLDER_IDS:
            ids.append(PLACEHOLDER_IDS[chunk])
        elif chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
    return ids


def tokenize_conversation(prompt: str, tokenizer, separator: str = DEFAULT_SEPARATOR
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of a rendered conversation, with the reference's label masking.

    Labels: position 0 ignored; per round (split on the separator) the instruction part up to and
    including "[/INST] " is ignored except its last token (the reference's `len - 2`, kept on
    purpose); everything after the last round is ignored; if the counted length disagrees with the
    number of non-pad ids, all labels are ignored (the reference warns and does the same).
    """
    input_ids = torch.tensor(tokenize_with_placeholders(prompt, tokenizer), dtype=torch.long)
    labels = input_ids.clone()
    pad_id = tokenizer.pad_token_id
    total_len = int(input_ids.numel() if pad_id is None else (input_ids != pad_id).sum())

    cur_len = 1
    labels[:cur_len] = IGNORE_LABEL_ID
    for round_text in prompt.split(separator):
        if round_text == "":
            break
        parts = round_text.split(INSTRUCTION_END)
        if len(parts) != 2:
            break
        round_len = len(tokenize_with_placeholders(round_text, tokenizer))
        instruction_len = len(tokenize_with_placeholders(parts[0] + INSTRUCTION_END, tokenizer)) - 2
        labels[cur_len:cur_len + instruction_len] = IGNORE_LABEL_ID
        cur_len += round_len
    labels[cur_len:] = IGNORE_LABEL_ID

    max_len = getattr(tokenizer, "model_max_length", None)
    if (max_len is None or cur_len < max_len) and cur_len != total_len:
        labels[:] = IGNORE_LABEL_ID
        logger.warning("tokenization mismatch: %d vs. %d tokens; all labels of this sample are ignored",
                       cur_len, total_len)
    return input_ids, labels


def encode_payload(tokenizer, text: str) -> torch.Tensor:
    """Ids of `text` followed by the `[SEG]` id: what the model embeds at `<refer>` / `<answer>`."""
    ids = tokenizer.encode(text, add_special_tokens=False) if text else []
    return torch.tensor(ids + [seg_token_id(tokenizer)], dtype=torch.long)


class TextEncoder:
    """Encodes the text side of samples of one dataset; the prompt is tokenised once and reused, and so is
    each question/answer text (a training run sees the same few thousand texts every epoch; at most
    PAYLOAD_CACHE_SIZE are kept)."""

    PAYLOAD_CACHE_SIZE = 200_000

    def __init__(self, tokenizer, template: PromptTemplate):
        self.tokenizer = tokenizer
        self.template = template
        self.prompt = build_conversation(template)
        self._input_ids, self._labels = tokenize_conversation(self.prompt, tokenizer)
        self._refer_indices = (self._input_ids == REFER_TOKEN_INDEX).long()
        self._answer_indices = (self._input_ids == ANSWER_TOKEN_INDEX).long()
        self._seg_id = seg_token_id(tokenizer)
        self._payload_ids: dict[str, tuple[int, ...]] = {}

    def __call__(self, instruction: str, answer: str | None = None) -> dict:
        """`answer` is used only by prompts with an `<answer>` slot; None/"" -> NO_TARGET_ANSWER."""
        if not isinstance(instruction, str):
            raise ValueError(f"instruction must be a str, got {type(instruction).__name__}: {instruction!r}")
        out = {
            "input_ids": self._input_ids.clone(),
            "labels": self._labels.clone(),
            "token_refer_id": self._payload(" " + instruction),
            "refer_embedding_indices": self._refer_indices.clone(),
        }
        if self.template.has_answer:
            out["token_answer_id"] = self._payload(answer if answer else NO_TARGET_ANSWER)
            out["answer_embedding_indices"] = self._answer_indices.clone()
        out["dataset_type"] = self.template.dataset_type
        return out

    def _payload(self, text: str) -> torch.Tensor:
        ids = self._payload_ids.get(text)
        if ids is None:
            ids = (*(self.tokenizer.encode(text, add_special_tokens=False) if text else ()), self._seg_id)
            if len(self._payload_ids) < self.PAYLOAD_CACHE_SIZE:
                self._payload_ids[text] = ids
        return torch.tensor(ids, dtype=torch.long)


def encode_query(tokenizer, query: str, task: str = "reasoning", template: PromptTemplate | None = None) -> dict:
    """Text-side inputs for a free (image, query) pair at inference, without ground truth.

    Uses `template` (default: TASK_PROMPTS[task], the evaluation prompt of the task's reference
    dataset; `data.registry.prompt_template(name, train=False)` gives another dataset's). For
    reasoning prompts the answer payload is just `[SEG]`: the answer sits after the description
    positions in a causal LLM, so it cannot change the predicted mask.
    """
    if task not in TASK_PROMPTS:
        raise ValueError(f"task={task!r} is not supported; expected one of {list(TASK_PROMPTS)}")
    template = template or TASK_PROMPTS[task]
    if TASK_OF_TYPE[template.dataset_type] != task:
        raise ValueError(f"the prompt is a {template.dataset_type} prompt but task={task!r}; pick a "
                         f"{TASK_PROMPTS[task].dataset_type} dataset's prompt or change the task")
    out = TextEncoder(tokenizer, template)(query)
    if template.has_answer:
        out["token_answer_id"] = torch.tensor([seg_token_id(tokenizer)], dtype=torch.long)
    return out
