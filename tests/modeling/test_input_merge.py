"""The vectorised embedding merge equals a plain per-token construction (the reference's loop)."""
import pytest
import torch

from segearthr1.modeling.input_merge import merge_multimodal_inputs
from segearthr1.processing import (ANSWER_TOKEN_INDEX, IGNORE_LABEL_ID, IMAGE_TOKEN_INDEX, REFER_TOKEN_INDEX,
                                   SEG_TOKEN_INDEX)

HIDDEN, VOCAB, PAD, SEG_ID, NUM_VISUAL = 8, 50, 0, 49, 4


def naive_merge(input_ids, attention_mask, labels, embed, visual, refer, answer, keep_seg):
    """One sample at a time, one token at a time: what the reference does."""
    rows = []
    for b in range(input_ids.shape[0]):
        embs, labs, desc = [], [], []
        for pos in range(input_ids.shape[1]):
            if not attention_mask[b, pos]:
                continue
            tok = int(input_ids[b, pos])
            lab = int(labels[b, pos])
            if tok == IMAGE_TOKEN_INDEX:
                embs += list(visual[b]); labs += [IGNORE_LABEL_ID] * NUM_VISUAL; desc += [False] * NUM_VISUAL
            elif tok == REFER_TOKEN_INDEX:
                embs += list(embed(refer[b])); labs += [IGNORE_LABEL_ID] * len(refer[b]); desc += [True] * len(refer[b])
            elif tok == ANSWER_TOKEN_INDEX:
                embs += list(embed(answer[b])); labs += answer[b].tolist(); desc += [False] * len(answer[b])
            elif tok == SEG_TOKEN_INDEX:
                if keep_seg:
                    embs.append(embed(torch.tensor([SEG_ID]))[0]); labs.append(SEG_ID if lab != IGNORE_LABEL_ID else lab)
                    desc.append(False)
            else:
                embs.append(embed(torch.tensor([tok]))[0]); labs.append(lab); desc.append(False)
        rows.append((torch.stack(embs), torch.tensor(labs), torch.tensor(desc)))
    length = max(len(r[1]) for r in rows)
    out_e = torch.zeros(len(rows), length, HIDDEN)
    out_l = torch.full((len(rows), length), IGNORE_LABEL_ID)
    out_d = torch.zeros(len(rows), length, dtype=torch.bool)
    out_m = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, (e, l, d) in enumerate(rows):
        out_e[b, :len(l)], out_l[b, :len(l)], out_d[b, :len(l)], out_m[b, :len(l)] = e, l, d, True
    return out_e, out_l, out_d, out_m


def make_batch(with_answer: bool):
    rows = [
        [5, 6, IMAGE_TOKEN_INDEX, 7, REFER_TOKEN_INDEX, 8, 9, SEG_TOKEN_INDEX, 10] +
        ([ANSWER_TOKEN_INDEX, 11] if with_answer else []) + [12],
        [5, IMAGE_TOKEN_INDEX, REFER_TOKEN_INDEX, 9, SEG_TOKEN_INDEX] + ([ANSWER_TOKEN_INDEX] if with_answer else []),
    ]
    length = max(map(len, rows))
    ids = torch.full((2, length), PAD)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
    mask = ids != PAD
    labels = ids.clone()
    labels[:, :3] = IGNORE_LABEL_ID
    labels[~mask] = IGNORE_LABEL_ID
    refer = [torch.tensor([20, 21, 22, SEG_ID]), torch.tensor([23, SEG_ID])]
    answer = [torch.tensor([30, 31, SEG_ID]), torch.tensor([32, 33, 34, 35, SEG_ID])] if with_answer else None
    return ids, mask, labels, refer, answer


@pytest.mark.parametrize("with_answer", [False, True])
@pytest.mark.parametrize("keep_seg", [False, True])
def test_merge_matches_per_token_construction(with_answer, keep_seg):
    embed = torch.nn.Embedding(VOCAB, HIDDEN)
    ids, mask, labels, refer, answer = make_batch(with_answer)
    visual = torch.randn(2, NUM_VISUAL, HIDDEN)
    merged = merge_multimodal_inputs(ids, mask, labels, embed, visual, refer, answer, seg_token_id=SEG_ID,
                                     keep_seg_token=keep_seg)
    e, l, d, m = naive_merge(ids, mask, labels, embed, visual, refer, answer, keep_seg)
    torch.testing.assert_close(merged.inputs_embeds, e, atol=0, rtol=0)
    assert torch.equal(merged.labels, l)
    assert torch.equal(merged.description_mask, d)
    assert torch.equal(merged.attention_mask, m)


def test_merge_rejects_missing_sentinel():
    embed = torch.nn.Embedding(VOCAB, HIDDEN)
    ids, mask, labels, refer, _ = make_batch(False)
    ids[1][ids[1] == IMAGE_TOKEN_INDEX] = 5
    with pytest.raises(ValueError, match="<image>"):
        merge_multimodal_inputs(ids, mask, labels, embed, torch.randn(2, NUM_VISUAL, HIDDEN), refer)


def test_merge_gradients_reach_embeddings_and_visual_tokens():
    embed = torch.nn.Embedding(VOCAB, HIDDEN)
    ids, mask, labels, refer, answer = make_batch(True)
    visual = torch.randn(2, NUM_VISUAL, HIDDEN, requires_grad=True)
    merged = merge_multimodal_inputs(ids, mask, labels, embed, visual, refer, answer)
    merged.inputs_embeds.sum().backward()
    assert visual.grad is not None and visual.grad.abs().sum() > 0
    assert embed.weight.grad[20].abs().sum() > 0 and embed.weight.grad[30].abs().sum() > 0
