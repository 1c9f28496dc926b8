"""A feature-level draft head (EAGLE-3 style): the model, its training-time unrolling, and its ONNX graph.

The head reads the target's own hidden states.  Slot i takes the target's features at position i
(``feature_layers`` of the target, concatenated, projected by ``fc`` to the hidden size) together with
the embedding of token i + 1, runs ONE decoder layer (attention over its own KV cache, then an MLP) and
predicts token i + 2 over a reduced draft vocabulary.  Later draft steps have no target features yet:
they feed the head's own output hidden state of the previous slot instead (``use_target = 0``).

    e   = norm_e(embed(token))                        the target's embedding, frozen
    h   = fc(target_features)  if use_target else  hidden_in
    x   = concat(e, norm_h(h))                        [2H]: the attention's input (EAGLE-3)
    h'  = h + o_proj(attention(x))                    rotary positions, grouped-query, own KV cache
    out = h' + mlp(norm_post(h'))                     -> hidden_out (fed to the next draft step)
    logits = lm_head(norm_final(out))                 [draft vocab]; draft_vocab[j] = its target id

Training (``scripts/train_head.py``) unrolls several draft steps ("training-time test"): step j sees
real features up to slot t - j and its own outputs after that, exactly as the runtime will.  The ONNX
graph (``build_onnx``) has the step interface of every specrt graph -- input_ids, past_length, an
in-place KV cache -- plus the feature inputs and ``hidden_out``; ``runtime/drafters/eagle.py`` runs it.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = "head.safetensors"
DRAFT_VOCAB = "draft_vocab.json"
# graph tensor names (the manifest records them)
HIDDEN_IN, TARGET_FEATURES, USE_TARGET, HIDDEN_OUT = "hidden_in", "target_features", "use_target", "hidden_out"


@dataclass
class HeadConfig:
    hidden_size: int
    feature_layers: list[int]  # the target's hidden_states indices the head reads
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    draft_vocab_size: int
    target_vocab_size: int
    rms_norm_eps: float
    rope_theta: float

    @property
    def feature_size(self) -> int:
        return len(self.feature_layers) * self.hidden_size

    @classmethod
    def for_target(cls, cfg, feature_layers: list[int], draft_vocab_size: int) -> HeadConfig:
        heads = cfg.num_attention_heads
        return cls(cfg.hidden_size, list(feature_layers), heads, cfg.num_key_value_heads,
                   getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, cfg.intermediate_size,
                   draft_vocab_size, cfg.vocab_size, float(cfg.rms_norm_eps), float(getattr(cfg, "rope_theta", 1e4)))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> HeadConfig:
        return cls(**json.loads(path.read_text()))


def _torch():
    import torch
    from torch import nn

    return torch, nn


def make_head(cfg: HeadConfig, embed_weight):
    """The head as a torch module; ``embed_weight`` [target vocab, hidden] is the target's, frozen."""
    torch, nn = _torch()
    import torch.nn.functional as F

    class RMSNorm(nn.Module):
        def __init__(self, size: int, eps: float):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(size))
            self.eps = eps

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    class DraftHead(nn.Module):
        def __init__(self):
            super().__init__()
            H, hd = cfg.hidden_size, cfg.head_dim
            self.cfg = cfg
            self.register_buffer("embed", embed_weight.detach().float().clone(), persistent=False)
            self.fc = nn.Linear(cfg.feature_size, H, bias=False)
            self.embed_norm, self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps), RMSNorm(H, cfg.rms_norm_eps)
            self.q_proj = nn.Linear(2 * H, cfg.num_heads * hd, bias=False)
            self.k_proj = nn.Linear(2 * H, cfg.num_kv_heads * hd, bias=False)
            self.v_proj = nn.Linear(2 * H, cfg.num_kv_heads * hd, bias=False)
            self.o_proj = nn.Linear(cfg.num_heads * hd, H, bias=False)
            self.post_norm = RMSNorm(H, cfg.rms_norm_eps)
            self.gate_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
            self.up_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
            self.down_proj = nn.Linear(cfg.intermediate_size, H, bias=False)
            self.final_norm = RMSNorm(H, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(H, cfg.draft_vocab_size, bias=False)
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            self.register_buffer("inv_freq", inv.float(), persistent=False)

        def rotary(self, x, pos):  # x [B, heads, T, hd], pos [T]: rotate_half convention (Llama)
            freqs = pos[:, None].float() * self.inv_freq[None, :]
            cos, sin = freqs.cos().repeat(1, 2), freqs.sin().repeat(1, 2)
            half = x.shape[-1] // 2
            rot = torch.cat((-x[..., half:], x[..., :half]), -1)
            return x * cos + rot * sin

        def unrolled(self, next_ids, features, steps: int, return_hidden: bool = False):
            """Training-time test: logits [steps][B, T, Vd] of ``steps`` unrolled draft steps (and, with
            ``return_hidden``, each step's output hidden states [steps][B, T, H]).

            next_ids [B, T]: token t + 1 at slot t; features [B, T, F]: the target's, at slot t.  Step j at
            slot t reads real features up to slot t - j and its own outputs for the j slots after that.
            """
            B, T = next_ids.shape
            cfg = self.cfg
            hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
            pos = torch.arange(T, device=next_ids.device)
            e = self.embed_norm(F.embedding(next_ids, self.embed))
            h = self.fc(features)
            keys, values, logits, outs = [], [], [], []
            t_idx, s_idx = pos[:, None], pos[None, :]
            for j in range(steps):
                x = torch.cat((e, self.hidden_norm(h)), -1)
                q = self.rotary(self.q_proj(x).view(B, T, nh, hd).transpose(1, 2), pos)
                k = self.rotary(self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2), pos)
                v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
                keys.append(k)
                values.append(v)
                # query (t) sees step-0 keys at slots <= t - j, and step m's key at slot t - j + m (m >= 1)
                masks = [s_idx <= t_idx - j] + [s_idx == t_idx - j + m for m in range(1, j + 1)]
                mask = torch.cat(masks, -1)  # [T, (j+1) T]
                kk = torch.cat(keys, 2).repeat_interleave(nh // nkv, 1)
                vv = torch.cat(values, 2).repeat_interleave(nh // nkv, 1)
                # rows with nothing visible (t < j) attend to their own key to stay finite; their loss is masked
                mask = mask | (~mask.any(-1, keepdim=True) & torch.cat(
                    [torch.zeros(T, T * j, dtype=torch.bool, device=mask.device),
                     torch.eye(T, dtype=torch.bool, device=mask.device)], -1))
                a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
                h2 = h + self.o_proj(a.transpose(1, 2).reshape(B, T, nh * hd))
                out = h2 + self.down_proj(F.silu(self.gate_proj(self.post_norm(h2))) * self.up_proj(self.post_norm(h2)))
                logits.append(self.lm_head(self.final_norm(out)))
                outs.append(out)
                h = torch.cat((torch.zeros_like(out[:, :1]), out[:, :-1]), 1)  # slot t reads slot t - 1's output
            return (logits, outs) if return_hidden else logits

    return DraftHead()


def trainable_state(head) -> dict:
    """The head's own weights (the frozen embedding is the target's and is not stored)."""
    return {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}


# ------------------------------------------------------------------------------------------ ONNX graph
def build_onnx(cfg: HeadConfig, weights: dict, embed_weight: np.ndarray, max_context: int):
    """The head's step graph (in-place KV cache through ONNX Runtime's GroupQueryAttention, as the target's).

    inputs   input_ids int64 [1, n]; past_length int64 [1]; logits_from int64 [1]; hidden_in f32 [1, n, H];
             target_features f32 [1, n, F]; use_target int64 [1] (1: read target_features, 0: hidden_in);
             cache_key.0 / cache_value.0 [1, kv_heads, max_context, head_dim]
    outputs  logits f32 [1, n - logits_from, draft_vocab]; hidden_out f32 [1, n, H]; present_key.0 / present_value.0

    ``logits_from`` as in the target's graph (``gqa_graph``): the drafter wants one row of logits after a pass
    over real features (the prompt, a commit), and the LM head over the draft vocabulary is half the head's work
    per row -- on a 1,000-token prompt, ~90 ms of fp32 compute here for logits nobody reads.
    """
    import onnx
    from onnx import TensorProto, helper
    from specrt.export.gqa_graph import INPUT_IDS, LOGITS, LOGITS_FROM, PAST_LENGTH, _Graph, names

    def w(name):
        return np.asarray(weights[name], dtype=np.float32)

    H, hd, eps = cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps
    g = _Graph()
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    freqs = np.outer(np.arange(max_context, dtype=np.float64), inv)
    cos, sin = g.weight("rotary.cos", np.cos(freqs)), g.weight("rotary.sin", np.sin(freqs))
    one = g.const("one", [1])
    seq = g.op("Slice", [g.op("Shape", [INPUT_IDS], "ids_shape")[0], one, g.const("two", [2])], "seq")[0]
    total = g.op("Add", [PAST_LENGTH, seq], "total")[0]
    seqlens_k = g.op("Cast", [g.op("Sub", [total, one], "last_pos")[0]], "seqlens_k", to=TensorProto.INT32)[0]
    total_len = g.op("Cast", [g.op("Squeeze", [total], "total_scalar")[0]], "total_len", to=TensorProto.INT32)[0]

    emb = g.op("Gather", [g.weight("embed_tokens.weight", embed_weight), INPUT_IDS], "embeds")[0]
    e = g.op("SimplifiedLayerNormalization", [emb, g.weight("embed_norm.weight", w("embed_norm.weight"))],
             "embed_normed", axis=-1, epsilon=eps, stash_type=1)[0]
    projected = g.op("MatMul", [TARGET_FEATURES, g.weight("fc.weight", w("fc.weight").T)], "projected")[0]
    cond = g.op("Cast", [USE_TARGET], "use_target_bool", to=TensorProto.BOOL)[0]
    h = g.op("Where", [cond, projected, HIDDEN_IN], "head_hidden")[0]
    hn = g.op("SimplifiedLayerNormalization", [h, g.weight("hidden_norm.weight", w("hidden_norm.weight"))],
              "hidden_normed", axis=-1, epsilon=eps, stash_type=1)[0]
    x = g.op("Concat", [e, hn], "attn_in", axis=-1)[0]
    qkv_w = np.concatenate([w("q_proj.weight"), w("k_proj.weight"), w("v_proj.weight")], 0).T
    qkv = g.op("MatMul", [x, g.weight("qkv_proj.weight", qkv_w)], "qkv")[0]
    n = names(1)
    attn = g.op("GroupQueryAttention", [qkv, "", "", n["key_buffers"][0], n["value_buffers"][0], seqlens_k,
                                         total_len, cos, sin],
                ["attn", n["new_keys"][0], n["new_values"][0]], "com.microsoft", num_heads=cfg.num_heads,
                kv_num_heads=cfg.num_kv_heads, do_rotary=1, rotary_interleaved=0, scale=float(hd) ** -0.5)[0]
    o = g.op("MatMul", [attn, g.weight("o_proj.weight", w("o_proj.weight").T)], "o")[0]
    post, _, _, h2 = g.op("SkipSimplifiedLayerNormalization", [o, h, g.weight("post_norm.weight", w("post_norm.weight"))],
                          ["post_normed", "", "", "residual_mid"], "com.microsoft", epsilon=eps)
    gate_up_w = np.concatenate([w("gate_proj.weight"), w("up_proj.weight")], 0).T
    gate_up = g.op("MatMul", [post, g.weight("gate_up.weight", gate_up_w)], "gate_up")[0]
    gate, up = g.op("Split", [gate_up, g.const("split", [cfg.intermediate_size] * 2)], ["gate", "up"], axis=-1)
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], "sig")[0]], "silu")[0], up], "act")[0]
    down = g.op("MatMul", [act, g.weight("down_proj.weight", w("down_proj.weight").T)], "down")[0]
    g.op("Add", [down, h2], HIDDEN_OUT)
    final = g.op("SimplifiedLayerNormalization", [HIDDEN_OUT, g.weight("final_norm.weight", w("final_norm.weight"))],
                 "final_normed", axis=-1, epsilon=eps, stash_type=1)[0]
    rows = g.op("Slice", [final, LOGITS_FROM, g.const("int64_max", [2**63 - 1]), one], "head_rows")[0]
    g.op("MatMul", [rows, g.weight("lm_head.weight", w("lm_head.weight").T)], LOGITS)

    buffer = [1, cfg.num_kv_heads, max_context, hd]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes, "specrt_feature_head",
        [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, [1, "sequence_length"]),
         helper.make_tensor_value_info(PAST_LENGTH, TensorProto.INT64, [1]),
         helper.make_tensor_value_info(LOGITS_FROM, TensorProto.INT64, [1]),
         helper.make_tensor_value_info(HIDDEN_IN, f32, [1, "sequence_length", H]),
         helper.make_tensor_value_info(TARGET_FEATURES, f32, [1, "sequence_length", cfg.feature_size]),
         helper.make_tensor_value_info(USE_TARGET, TensorProto.INT64, [1])]
        + [helper.make_tensor_value_info(b, f32, buffer) for b in n["key_buffers"] + n["value_buffers"]],
        [helper.make_tensor_value_info(LOGITS, f32, [1, "logits_rows", cfg.draft_vocab_size]),
         helper.make_tensor_value_info(HIDDEN_OUT, f32, [1, "sequence_length", H])]
        + [helper.make_tensor_value_info(o, f32, buffer) for o in n["new_keys"] + n["new_values"]],
        g.inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="specrt")


def count_params(weights: dict) -> int:
    return int(sum(math.prod(v.shape) for v in weights.values()))


# ------------------------------------------------------------------------------------------ export
def load_head(head_dir: Path):
    """(config, fp32 weights as numpy, draft vocabulary) of a trained head directory (``scripts/train_head.py --export``)."""
    from safetensors.numpy import load_file

    head_dir = Path(head_dir)
    for name in (HEAD_CONFIG, HEAD_WEIGHTS, DRAFT_VOCAB):
        if not (head_dir / name).is_file():
            raise FileNotFoundError(f"{head_dir} has no {name}: a draft head directory holds {HEAD_CONFIG}, "
                                    f"{HEAD_WEIGHTS} and {DRAFT_VOCAB} (scripts/train_head.py --export)")
    cfg = HeadConfig.load(head_dir / HEAD_CONFIG)
    weights = {k: v.astype(np.float32) for k, v in load_file(str(head_dir / HEAD_WEIGHTS)).items()}
    vocab = json.loads((head_dir / DRAFT_VOCAB).read_text())
    if len(vocab) != cfg.draft_vocab_size:
        raise ValueError(f"{head_dir}: {DRAFT_VOCAB} has {len(vocab)} ids for a {cfg.draft_vocab_size}-way head")
    return cfg, weights, vocab


def save_head(head_dir: Path, cfg: HeadConfig, weights: dict, vocab: list[int]) -> None:
    """Write a head directory (fp16 weights, config, draft vocabulary)."""
    import torch
    from safetensors.torch import save_file

    head_dir = Path(head_dir)
    head_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.as_tensor(np.asarray(v)).to(torch.float16).contiguous() for k, v in weights.items()},
              str(head_dir / HEAD_WEIGHTS))
    cfg.save(head_dir / HEAD_CONFIG)
    (head_dir / DRAFT_VOCAB).write_text(json.dumps([int(t) for t in vocab]))


def export_head(head_dir: Path, target_checkpoint: Path, out_dir: Path, max_context: int, target_config) -> dict:
    """``draft.onnx`` from a trained head and the target's embedding; returns the manifest entry."""
    import onnx
    import torch
    from specrt.export import gqa_graph
    from specrt.export.onnx_export import model_entry
    from transformers import AutoModelForCausalLM

    cfg, weights, vocab = load_head(head_dir)
    if cfg.hidden_size != target_config.hidden_size or cfg.target_vocab_size != target_config.vocab_size:
        raise ValueError(f"the head was trained for a target with hidden size {cfg.hidden_size} and vocabulary "
                         f"{cfg.target_vocab_size}; this target has {target_config.hidden_size} and "
                         f"{target_config.vocab_size}")
    hf = AutoModelForCausalLM.from_pretrained(target_checkpoint, dtype=torch.float32)
    embed = hf.get_input_embeddings().weight.detach().numpy().copy()
    del hf
    model = build_onnx(cfg, weights, embed, max_context)
    path = out_dir / "draft.onnx"
    onnx.save_model(model, str(path))
    (out_dir / DRAFT_VOCAB).write_text(json.dumps([int(t) for t in vocab]))
    entry = model_entry(model, path, None, "EagleDraftHead", "feature-head", 1, cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, cfg.hidden_size, "float32", cfg.draft_vocab_size, max_context,
                        gqa_graph.names(1), {"update": "in-place", "attention": "group-query-attention",
                                             "logits_from": gqa_graph.LOGITS_FROM})
    entry["kind"] = "feature-head"
    entry["feature_head"] = {"hidden_input": HIDDEN_IN, "features_input": TARGET_FEATURES, "select_input": USE_TARGET,
                             "hidden_output": HIDDEN_OUT, "hidden_size": cfg.hidden_size,
                             "feature_size": cfg.feature_size, "layers": list(cfg.feature_layers),
                             "draft_vocab": DRAFT_VOCAB}
    training = Path(head_dir) / "training.json"
    if training.is_file():  # what the model card says, in the engine: data, steps, held-out acceptance
        record = json.loads(training.read_text())
        entry["feature_head"]["training"] = {k: record[k] for k in ("step", "training_minutes", "tokens_trained",
                                                                    "held_out") if k in record}
    return entry


def verify(target_spec, head_spec, target_checkpoint: Path, head_dir: Path, n: int = 24, seed: int = 0) -> dict:
    """Max |ONNX - PyTorch| of the target's features (every layer the head reads; relative to their largest
    magnitude) and of the head's logits and hidden output, for a pass over real features and for a step fed its
    own previous output."""
    import torch
    from specrt.runtime.ort_backend import OrtModelStep
    from transformers import AutoModelForCausalLM

    cfg, weights, _ = load_head(head_dir)
    hf = AutoModelForCausalLM.from_pretrained(target_checkpoint, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.target_vocab_size, n + 1)
    target = OrtModelStep(target_spec)
    target.forward(ids[:n], 0)
    ort_features = target.features().copy()  # [n, F]
    captured = {}
    hook = hf.model.layers[-1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hs = hf(torch.from_numpy(ids[None, :n]), output_hidden_states=True).hidden_states
    hook.remove()
    layers = [hs[i][0] if i < len(hs) - 1 else captured["last"][0] for i in cfg.feature_layers]
    ref_features = torch.cat(layers, -1).numpy()
    # relative to the features' own scale: a 135M model's residual stream reaches hundreds (massive
    # activations), where fp32 rounding alone differs by 1e-2 in absolute terms
    scale = max(1.0, float(np.abs(ref_features).max()))
    diffs = {"target_features_rel": float(np.abs(ort_features - ref_features).max()) / scale}

    head = make_head(cfg, hf.get_input_embeddings().weight)
    head.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    head.eval()
    feats = torch.from_numpy(ref_features)[None]
    next_ids = torch.from_numpy(ids[1:n + 1])[None]
    with torch.no_grad():
        logits, outs = head.unrolled(next_ids, feats, 2, return_hidden=True)
    fh = head_spec.feature_head
    step = OrtModelStep(head_spec)
    real = step.forward(ids[1:n], 0, inputs={fh["hidden_input"]: np.zeros((1, n - 1, cfg.hidden_size), np.float32),
                                   fh["features_input"]: ref_features[None, :n - 1].astype(np.float32),
                                   fh["select_input"]: np.ones(1, np.int64)}).copy()
    hidden = step.output(fh["hidden_output"]).copy()
    diffs["head_real"] = float(np.abs(real - logits[0][0, :n - 1].numpy()).max())
    # what a quantized head's drift means for drafting: the share of slots whose first choice is unchanged
    diffs["head_real_argmax_equal"] = float((real.argmax(-1) == logits[0][0, :n - 1].numpy().argmax(-1)).mean())
    diffs["head_hidden"] = float(np.abs(hidden - outs[0][0, :n - 1].numpy()).max())
    own = step.forward(ids[n:n + 1], n - 1, inputs={fh["hidden_input"]: hidden[None, -1:],
                                          fh["features_input"]: np.zeros((1, 1, cfg.feature_size), np.float32),
                                          fh["select_input"]: np.zeros(1, np.int64)})
    diffs["head_own_step"] = float(np.abs(own[0] - logits[1][0, n - 1].numpy()).max())
    return diffs
