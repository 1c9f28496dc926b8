"""runtime/request.py: request parameters and prompts are untrusted -- clear errors, bounded work."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from specrt.runtime import Engine, GenerationError
from specrt.runtime.request import MAX_STOPS, Request, check_prompt


@pytest.fixture(scope="module")
def engine(engines):
    e = Engine.load(engines["close"])
    e.manifest = dataclasses.replace(e.manifest, eos_token_ids=frozenset())
    return e


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, r"max_new_tokens must be in \[1, inf\]"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": 5.0}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": "5"}, "max_new_tokens must be an integer"),
    ({"k": 3}, "k=3 is not one of this engine's compiled k values"),
    ({"k": 10**9}, r"k must be in \[1, 64\]"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": -1}, "temperature must be in"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -5}, "top_k must be in"),
    ({"seed": -1}, "seed must be in"),
    ({"seed": 2**64}, "seed must be in"),
    ({"stop": "x"}, "stop must be a list of strings"),
    ({"stop": [""]}, "non-empty string"),
    ({"stop": ["x" * 5000]}, "at most 1000 characters"),
    ({"stop": ["a"] * (MAX_STOPS + 1)}, f"at most {MAX_STOPS} stop strings"),
    ({"stop": ["\ud800"]}, "unpaired surrogate"),
    ({"policy": "magic"}, "unknown policy"),
    ({"acceptance": "relaxed"}, "relaxed acceptance needs accept_tau"),
    ({"acceptance": "relaxed", "accept_tau": 0.5, "temperature": 0.7}, "greedy decoding only"),
    ({"use_draft": "yes"}, "use_draft must be true or false"),
])
def test_bad_parameters_name_the_allowed_range(engine, kwargs, match):
    with pytest.raises(GenerationError, match=match):
        engine.generate([5, 17, 33], **kwargs)


@pytest.mark.parametrize("prompt, match", [
    ("\ud800 lone surrogate", "unpaired surrogate"),
    ("x" * (256 * 64 + 1), "characters; this engine's max context"),
    ([5, True], "must be integers"),
    ([5, 2.5], "must be integers"),
    ([5, -1], "outside the vocabulary"),
    ([5, 10**30], "outside the vocabulary"),
    (list(range(64)), "max context is 64"),
    (b"bytes", "text or a list of token ids"),
    ({"a": 1}, "text or a list of token ids"),
    (5, "text or a list of token ids"),
])
def test_bad_prompts(engine, prompt, match):
    with pytest.raises(GenerationError, match=match):
        engine.generate(prompt, max_new_tokens=2)


def test_any_unicode_prompt_and_stop_work(engine):
    text = "\x00 \x1b[31m \u202e 🧪 漢字 e\u0301 \U0010ffff"  # the tiny byte-level vocabulary: many tokens
    r = engine.generate(text, max_new_tokens=4, stop=["🧪", "\x00", "\u202e"])
    assert r.stats.new_tokens >= 1
    assert engine.generate(np.array([5, 17, 33], dtype=np.int32), max_new_tokens=2).stats.new_tokens == 2


def test_absurd_max_new_tokens_is_bounded_by_the_context(engine):
    r = engine.generate([5, 17, 33], max_new_tokens=10**18, k=2)
    assert r.stats.stop_reason == "max_context" and len(r.token_ids) == engine.max_context - 3


def test_validate_normalises_numpy_values():
    req = Request(max_new_tokens=np.int64(5), k=np.int32(2), stop=["a"], seed=np.uint8(3)).validate((1, 2, 4))
    assert type(req.max_new_tokens) is int and type(req.k) is int and req.stop == ("a",) and type(req.seed) is int


ANY = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True) | \
    st.text(max_size=8) | st.lists(st.text(max_size=4) | st.integers(), max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(max_new_tokens=ANY | st.integers(1, 6), k=ANY | st.sampled_from([1, 2, 4, 8]), temperature=ANY,
       top_k=ANY, top_p=ANY, seed=ANY, stop=ANY, policy=st.sampled_from(["fixed", "adaptive", "x"]) | ANY,
       prompt=st.text(max_size=30) | st.lists(st.integers(-5, 500), max_size=8))
def test_fuzzed_requests_end_in_a_result_or_generation_error(engine, max_new_tokens, k, temperature, top_k, top_p,
                                                             seed, stop, policy, prompt):
    try:
        r = engine.generate(prompt, max_new_tokens=max_new_tokens, k=k, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop=stop, policy=policy)
    except GenerationError as e:
        assert str(e)
        return
    assert 1 <= len(r.token_ids) <= engine.max_context


def test_check_prompt_never_encodes_an_oversized_text():
    def encode(_):
        raise AssertionError("a prompt longer than the context can hold must be refused unread")
    with pytest.raises(GenerationError, match="characters"):
        check_prompt("y" * 10**6, vocab_size=100, max_context=64, encode=encode)


def test_the_cli_the_server_and_request_agree_on_the_fields():
    """Every request field is a flag of `specrt generate` and a field of the HTTP body (but the LOSSY relaxed
    acceptance, an operator's choice), each derived from runtime/request.py -- none spelled out by hand."""
    from specrt.runtime import request

    from specrt import cli, server

    subcommands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    flags = {a.dest for a in subcommands["generate"]._actions}
    assert set(request.params_of()) <= flags
    served = set(server.HTTP_FIELDS.values())
    assert served == set(request.params_of()) - {"acceptance", "accept_tau"}
    assert set(server.EXTRA) == set(server.HTTP_FIELDS) - server.SUPPORTED


def test_a_new_request_field_reaches_the_cli_and_the_server_from_one_declaration():
    """Adding a field is one line in runtime/request.py: the CLI flag, the HTTP field and the documentation follow."""
    import argparse

    from specrt.runtime import request

    @dataclasses.dataclass(frozen=True)
    class Extended(request.Request):
        beam_width: int = request.param(1, "int", "how many beams (a field made up for this test)", lo=1, hi=8)

    parser = argparse.ArgumentParser()
    request.add_arguments(parser, Extended)
    args = parser.parse_args(["--beam-width", "3", "--no-draft"])
    assert request.from_arguments(args, Extended)["beam_width"] == 3 and args.use_draft is False
    assert request.http_fields(Extended)["beam_width"] == "beam_width"
    assert "``beam_width`` (int, default 1): how many beams" in request.describe(Extended)
    with pytest.raises(GenerationError, match=r"beam_width must be in \[1, 8\]"):
        Extended(beam_width=9).validate((1, 2, 4, 8))
    with pytest.raises(GenerationError, match="confidence_tau must be in"):  # one range, checked once: (0, 1)
        Extended(confidence_tau=1.0).validate((1, 2, 4, 8))
