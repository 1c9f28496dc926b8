"""Tiny random-initialised checkpoints and tokenizers, built from configs (no hub access needed)."""
from __future__ import annotations

from pathlib import Path

CORPUS = [
    "def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
    "import os\nimport sys\nprint(os.getcwd())\n", "Speculative decoding proposes tokens with a small draft.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n", "Hello world! How are you today?",
    "for i in range(10):\n    print(i * i)\n", "numbers = [1, 2, 3, 4, 5]\nprint(sum(numbers))\n",
] * 20
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 384


def make_tokenizer(vocab_size: int = VOCAB, seed_words: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS + list(seed_words), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(family: str, vocab: int, layers: int, hidden: int, heads: int, kv_heads: int, eos: int):
    import transformers as T

    common = {"vocab_size": vocab, "bos_token_id": eos, "eos_token_id": eos}
    if family == "llama":
        return T.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                             **common)
    if family == "qwen2":
        return T.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                             use_sliding_window=False, **common)
    if family == "mistral":
        return T.MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                               sliding_window=None, **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256, **common)
    if family == "phi3":
        return T.Phi3Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                            original_max_position_embeddings=256, pad_token_id=eos, **common)
    raise ValueError(family)


def make_checkpoint(path: Path, family: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64,
                    heads: int = 4, kv_heads: int = 2, vocab: int = VOCAB, tokenizer=None,
                    init_std: float | None = None) -> Path:
    """Save a random-initialised causal LM + tokenizer to ``path``."""
    import torch
    import transformers as T

    tokenizer = tokenizer or make_tokenizer()
    cfg = _config(family, vocab, layers, hidden, heads, kv_heads, tokenizer.eos_token_id)
    if init_std is not None:
        cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


HEAD_PROMPTS = [[5], [17, 33, 2], list(range(40, 52)), [5, 17, 33], [40, 41, 42, 43]]


def make_head(path: Path, target: Path, steps: int = 300, draft_vocab: int = 256, seed: int = 0) -> Path:
    """A feature head for a tiny target, trained for a few seconds to predict the target's greedy tokens on a
    reduced vocabulary.  It memorises more than it generalises (a few thousand tokens): its training set holds
    the continuations of ``HEAD_PROMPTS`` -- the prompts the tests use -- so that drafts are accepted often
    enough there to exercise every path (all accepted, partly, none); elsewhere it is nearly a random draft."""
    import numpy as np
    import torch
    import transformers as T
    from specrt.export.feature_head import HeadConfig, save_head, trainable_state
    from specrt.export.feature_head import make_head as build

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_pretrained(target).eval()
    cfg = HeadConfig.for_target(model.config, [1, model.config.num_hidden_layers], draft_vocab)
    rng = np.random.default_rng(seed)
    vocab = np.sort(rng.choice(model.config.vocab_size, draft_vocab, replace=False))
    with torch.no_grad():  # the target's greedy continuations: text it would write
        rows = [model.generate(torch.tensor([p]), max_new_tokens=40 - len(p), do_sample=False, pad_token_id=0)[0]
                for p in HEAD_PROMPTS]
        rows += list(model.generate(torch.from_numpy(rng.integers(0, model.config.vocab_size, (16, 4))),
                                    max_new_tokens=36, do_sample=False, pad_token_id=0))
        ids = torch.stack(rows)
        captured = {}
        hook = model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("x", o[0] if
                                                                                                isinstance(o, tuple) else o))
        out = model(ids, output_hidden_states=True)
        hook.remove()
        features = torch.cat([out.hidden_states[1], captured["x"]], -1)
        greedy = out.logits.argmax(-1)  # [B, T]: the target's choice after each position
    to_draft = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    to_draft[torch.from_numpy(vocab)] = torch.arange(draft_vocab)
    head = build(cfg, model.get_input_embeddings().weight)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = head.unrolled(ids[:, 1:], features[:, :-1], 2)  # slot t: features t, token t + 1 -> t + 2
        target = to_draft[greedy[:, 1:]]  # the target's choice after token t + 1
        loss = sum(torch.nn.functional.cross_entropy(lg[:, j:].reshape(-1, draft_vocab), target[:, j:].reshape(-1),
                                                     ignore_index=-1) for j, lg in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_head(path, cfg, {k: v.numpy() for k, v in trainable_state(head).items()}, vocab.tolist())
    return path


def edit_manifest(path: Path, fn) -> None:
    """Apply ``fn`` to an engine directory's manifest.json (tests that damage it)."""
    import json

    data = json.loads((path / "manifest.json").read_text())
    fn(data)
    (path / "manifest.json").write_text(json.dumps(data))
