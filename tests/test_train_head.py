"""``scripts/train_head.py``: what a training batch weighs, and how a head starts from another."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import batch_gen
import train_head


def _shard(tokens: list[int]) -> dict:
    n = len(tokens)
    top_ids = np.zeros((n, 8), np.int32)
    top_ids[:-1, 0] = tokens[1:]  # the verifier's first choice at each row: the next token, sure of it
    top_logp = np.full((n, 8), -30, np.float16)
    top_logp[:, 0] = 0
    return {"features": np.zeros((n, 1, 4), np.float16), "layers_idx": [0], "tokens": np.asarray(tokens, np.int32),
            "top_ids": top_ids, "top_logp": top_logp, "roles": np.ones(n, np.uint8),
            "starts": np.array([0, n], np.int64)}


def test_repeat_weight_scales_the_slots_whose_token_repeats_an_earlier_16_gram():
    tokens = list(range(1, 41)) + list(range(1, 31))  # the second run repeats the first: its 16-grams recur
    shard = _shard(tokens)
    seqs = [(0, 0, len(tokens), "s", "f")]
    to_draft = np.arange(64)

    def weight(repeat_weight: float) -> np.ndarray:
        batch = train_head.Batches([shard], seqs, to_draft, T=128, B=1, seed=0, repeat_weight=repeat_weight)()
        return batch[4].numpy()[0]

    plain, down = weight(1.0), weight(0.25)
    t = len(tokens) - 1
    copied = batch_gen.repeated(tokens)[2:t + 2]  # slot s is trained on the token at s + 2
    copied = np.pad(copied, (0, t - len(copied)))
    assert copied.any() and (plain[:t][~copied] > 0).any()
    np.testing.assert_allclose(down[:t], plain[:t] * np.where(copied, 0.25, 1.0))
    np.testing.assert_array_equal(down[t:], 0)


def test_speculate_replays_passes_as_live_chain_speculation():
    roles = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1])  # two answers: tokens 2..7 and 9..11
    truth = np.arange(len(roles)) + 100
    perfect = np.array([[s + 2 + j + 100 for j in range(2)] for s in range(len(roles) - 1)])
    offered, accepted, passes, tokens = train_head.speculate(perfect, truth, roles)
    # answer 1: pass 1 drafts 3, 4 and commits 3, 4, 5; pass 2 drafts and commits 6, 7 (no bonus past the end);
    # answer 2: one pass drafts and commits 10, 11
    assert (passes, tokens) == (3, 7)
    np.testing.assert_array_equal(offered, [3, 3])
    np.testing.assert_array_equal(accepted, [3, 3])

    wrong = perfect + 1000
    offered, accepted, passes, tokens = train_head.speculate(wrong, truth, roles)
    assert (passes, tokens) == (7, 7)  # every token after each answer's first is the verifier's own
    np.testing.assert_array_equal(accepted, [0, 0])
    np.testing.assert_array_equal(offered, [7, 0])

    # right only where a pass starts after a correction at an even position: the replay, not every position, decides
    half = perfect.copy()
    half[1::2, 0] += 1000  # chains started at odd slots miss their first draft
    _, accepted, passes, _ = train_head.speculate(half, truth, roles, answer_tokens=3)
    # answer 1 capped at tokens 2..4: pass from slot 1 (committed 2) misses -> commits 3; slot 2 drafts 4: right
    assert passes == 2 + 1 and accepted[0] == 1 + 1


def test_miss_weight_scales_the_chains_that_start_after_a_wrong_first_draft():
    import torch

    B, T, V = 1, 6, 5
    d = torch.zeros(B, T, 8, dtype=torch.long)
    d[..., 0] = torch.tensor([1, 2, 3, 4, 0, 1])  # the verifier's first choice at each slot
    w = torch.zeros(B, T, 8)
    w[..., 0] = 1.0
    weight = torch.ones(B, T)
    first = torch.full((B, T, V), -5.0)
    right = [True, False, True, True, False, True]  # the head's first draft at each slot
    for t, ok in enumerate(right):
        first[0, t, int(d[0, t, 0]) if ok else (int(d[0, t, 0]) + 1) % V] = 5.0
    steps = [first, torch.zeros(B, T, V)]  # step 1's cross-entropy is log(V) at every slot

    plain = train_head.loss_fn(steps, d, w, weight, decay=1.0)[1]
    heavy = train_head.loss_fn(steps, d, w, weight, decay=1.0, miss_weight=3.0)[1]
    assert heavy[1] == plain[1]  # step 1's loss is the same everywhere: reweighting slots leaves its mean alone
    # step 0: slots 2 and 5 follow a miss (slots 1 and 4) and are right; the others keep weight 1
    ce = -torch.log_softmax(first, -1).gather(-1, d[..., :1])[0, :, 0]
    m = torch.tensor([1.0, 1, 3, 1, 1, 3])
    assert abs(heavy[0] - float((ce * m).sum() / m.sum())) < 1e-6
    assert abs(plain[0] - float(ce.mean())) < 1e-6


def test_init_from_head_carries_each_output_row_to_its_token_in_a_new_vocabulary(tmp_path):
    """``--new-vocab``: rows of tokens both vocabularies hold follow their token; the others keep their start."""
    import json

    import torch
    from safetensors.torch import save_file
    from specrt.export.feature_head import DRAFT_VOCAB, HEAD_WEIGHTS, HeadConfig, make_head, trainable_state

    cfg = HeadConfig(hidden_size=16, feature_layers=[0, 1, 2], num_heads=2, num_kv_heads=1, head_dim=8,
                     intermediate_size=32, draft_vocab_size=4, target_vocab_size=32, rms_norm_eps=1e-5,
                     rope_theta=1e4)
    embed = torch.randn(32, 16)
    torch.manual_seed(0)
    old = make_head(cfg, embed)
    old_vocab = [3, 5, 7, 9]
    save_file({k: v.to(torch.float16).contiguous() for k, v in trainable_state(old).items()},
              str(tmp_path / HEAD_WEIGHTS))
    (tmp_path / DRAFT_VOCAB).write_text(json.dumps(old_vocab))
    saved = {k: v.float() for k, v in trainable_state(old).items()}

    new_vocab = np.array([1, 5, 9, 11, 12], np.int64)  # shares 5 and 9, in other rows
    new = make_head(HeadConfig(**{**cfg.__dict__, "draft_vocab_size": len(new_vocab)}), embed)
    with torch.no_grad():
        new.lm_head.weight.fill_(0.5)
    train_head.init_from_head(new, tmp_path, new_vocab)

    rows = new.lm_head.weight.detach()
    old_rows = saved["lm_head.weight"].to(torch.float16).float()
    torch.testing.assert_close(rows[1], old_rows[1])  # token 5
    torch.testing.assert_close(rows[2], old_rows[3])  # token 9
    for j in (0, 3, 4):  # tokens 1, 11, 12: not in the old vocabulary
        assert torch.all(rows[j] == 0.5)
    name = next(k for k in saved if k != "lm_head.weight")
    torch.testing.assert_close(dict(new.named_parameters())[name].detach(), saved[name].to(torch.float16).float())


def test_the_model_card_describes_the_shards_the_run_read_not_a_card_beside_them():
    def shard(convs: list[dict]) -> dict:
        sh = _shard(list(range(sum(len(a) for c in convs for a in c["answers"]) + len(convs))))
        return sh | {"convs": convs}

    read = [shard([{"source": "magpie", "family": "a", "kind": "magpie", "answers": [[1, 2, 3]]},
                   {"source": "manpages", "family": "ls", "kind": "code", "answers": [[4], [5, 6]], "sampled": True}]),
            shard([{"source": "magpie", "family": "b", "kind": "magpie", "answers": [[7, 8]], "looped": True}]),
            _shard([1, 2, 3, 4]) | {"convs": None}]  # a legacy shard: no sources recorded
    card = train_head.shards_card(read)
    assert (card["conversations"], card["answer_tokens"], card["legacy_conversations"]) == (3, 8, 1)
    assert card["sources"]["magpie"]["answer_tokens"] == 5 and card["sources"]["magpie"]["families"] == 2
    assert card["sources"]["manpages"]["two_turn"] == 1 and card["sampled"] == 1
    text = "\n".join(train_head.data_card(card))
    assert "3 conversations" in text and "8 answer tokens" in text and "the shards this run read" in text
    assert "1 more in shards that do not record their sources" in text and "1 answers ended" in text
    assert "| magpie | 2 | 2 | 5 | 62.5% |" in text
    # a record written before shards_card: a head_data.py card, prompt list included
    old = card | {"prompts": 5}
    assert "of the 5 prompts in its prompt list" in "\n".join(train_head.data_card(old))
