"""Chat templates from engine directories, rendered as untrusted code.

A chat template is a Jinja program that arrives inside ``manifest.json``, a file that travels between
machines and teams.  It is rendered the way transformers renders it (Jinja's *immutable sandbox*, the
same helpers: ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text), so real
templates produce exactly the same prompt, with these limits on top:

* no attribute or method the sandbox considers unsafe (``__class__``, ``__globals__``, ``mro`` ...):
  the class-hierarchy walks that turn a template into shell access end in ``SecurityError``;
* no ``cycler``, ``joiner`` or ``lipsum`` globals (no real template uses them; they are the usual
  first step of an escape); ``namespace`` stays, with a size check on what it stores;
* bounded work: every call, attribute lookup, filter and loop iteration (``range`` included) counts
  against an operation budget and a wall-clock deadline; ``*``, ``**``, ``%``, ``+`` and the string
  concatenation ``~`` refuse results past a size limit before computing them; filter arguments that
  size an output (``center(10**9)``) are capped; the rendered text itself is capped.

Whatever goes wrong ends in ``ChatTemplateError`` naming the limit or the refused operation; the
template's own ``raise_exception("...")`` (a message it refuses, say roles that do not alternate) ends
in ``GenerationError`` -- the request's fault, not the directory's.
"""
from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Namespace
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from specrt.runtime.errors import EngineDirError, GenerationError

MAX_OUTPUT_CHARS = 1 << 20  # a rendered prompt is at most ~1M characters (far past any max context)
MAX_VALUE_LEN = 1 << 20  # strings/lists a template may build
MAX_INT_BITS = 256  # integers a template may compute with (no 10**10**10 bignum hangs)
MAX_FILTER_INT = 10_000  # numeric filter arguments (widths, counts)
MAX_OPS = 2_000_000  # calls + attribute lookups + filter calls + loop iterations per render
DEADLINE_S = 2.0


class ChatTemplateError(EngineDirError):
    """The engine directory's chat template is invalid, refused by the sandbox, or exceeded a limit."""


@dataclass
class _Budget:
    ops: int = 0
    deadline: float = 0.0
    chars: int = 0


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("specrt_template_budget", default=None)


def _tick(n: int = 1) -> None:
    b = _budget.get()
    if b is None:
        return
    b.ops += n
    if b.ops > MAX_OPS:
        raise ChatTemplateError(f"the chat template exceeded {MAX_OPS:,} operations (an endless or enormous loop?)")
    if not b.ops & 0xFF and time.monotonic() > b.deadline:
        raise ChatTemplateError(f"the chat template took longer than {DEADLINE_S:g} s to render")


def _size(x) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else 0


def _check_size(x, what: str):
    if _size(x) > MAX_VALUE_LEN:
        raise ChatTemplateError(f"the chat template built a {what} of {_size(x):,} items (limit {MAX_VALUE_LEN:,})")
    if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > MAX_INT_BITS:
        raise ChatTemplateError(f"the chat template computed an integer of {x.bit_length()} bits "
                                f"(limit {MAX_INT_BITS})")
    return x


def _bounded_range(*args):
    """``range`` whose every item counts against the budget (the sandbox's own only caps the length)."""
    for a in args:
        if not isinstance(a, int) or abs(a) > MAX_VALUE_LEN:
            raise ChatTemplateError(f"range({', '.join(map(repr, args))}) is outside the template limits")
    for i in range(*args):
        _tick()
        yield i


class _CheckedNamespace(Namespace):
    """``namespace()`` whose stored values are size-checked (the one place a template can accumulate)."""

    def __setitem__(self, name, value):  # called by {% set ns.attr = value %}
        _tick()
        super().__setitem__(name, _check_size(value, f"value for namespace attribute {name!r}"))


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 100:
        raise ChatTemplateError("strftime_now takes a short format string")
    return time.strftime(fmt)


def _tojson(x, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # transformers' tojson: json.dumps, non-ASCII kept (Jinja's own escapes <, >, & and ' for HTML)
    if indent is not None and (not isinstance(indent, int) or not 0 <= indent <= 16):
        raise ChatTemplateError(f"tojson indent {indent!r} is outside the template limits")
    return _check_size(json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys), "JSON string")


def _raise_exception(message) -> None:
    raise GenerationError(f"the chat template refused these messages: {str(message)[:500]}")


# filters and str methods whose numeric arguments size their output
_SIZING = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap", "truncate", "batch",
                     "slice"})


def _precheck(name: str, value, args: tuple, kwargs: dict) -> None:
    """Refuse, before running it, a filter or string method whose result would be huge."""
    for a in (*args, *kwargs.values()) if name in _SIZING else ():
        if isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a) > MAX_FILTER_INT:
            raise ChatTemplateError(f"the chat template called {name!r} with {a!r} "
                                    f"(numeric arguments are limited to {MAX_FILTER_INT})")
    if name in ("format", "format_map") and isinstance(value, str):
        _check_format_widths(value)
    elif name == "replace" and isinstance(value, str) and len(args) >= 2 and isinstance(args[0], str):
        old, new = args[0], str(args[1])
        hits = value.count(old) if old else len(value) + 1
        if len(value) + hits * max(0, len(new) - len(old)) > MAX_VALUE_LEN:
            raise ChatTemplateError(f"the chat template's replace would build over {MAX_VALUE_LEN:,} characters")
    elif name == "join":
        sep, items = (value, args[0]) if isinstance(value, str) and args else (args[0] if args else "", value)
        if isinstance(items, (list, tuple)) and isinstance(sep, str):
            total = len(sep) * len(items) + sum(_size(x) if isinstance(x, str) else 16 for x in items)
            if total > MAX_VALUE_LEN:
                raise ChatTemplateError(f"the chat template's join would build over {MAX_VALUE_LEN:,} characters")
    elif name == "indent" and isinstance(value, str):
        width = args[0] if args else kwargs.get("width", 4)
        if isinstance(width, str) and len(width) * (value.count("\n") + 1) + len(value) > MAX_VALUE_LEN:
            raise ChatTemplateError(f"the chat template's indent would build over {MAX_VALUE_LEN:,} characters")


def _guard_filter(name: str, fn):
    skip = 1 if hasattr(fn, "jinja_pass_arg") else 0  # (context/environment,) value, then the arguments

    def guarded(*args, **kwargs):
        _tick()
        _precheck(name, args[skip] if len(args) > skip else None, args[skip + 1:], kwargs)
        return _check_size(fn(*args, **kwargs), f"result of the filter {name!r}")
    if hasattr(fn, "jinja_pass_arg"):  # keep jinja's pass_context / pass_environment marker
        guarded.jinja_pass_arg = fn.jinja_pass_arg
    return guarded


class _CheckedConcat(CodeGenerator):
    """``a ~ b`` compiles to a size-checked join (Jinja's own is a plain ``str.join``)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.autoescape or frame.eval_ctx.volatile:  # never on: autoescape is off below
            return super().visit_Concat(node, frame)
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+", "//"})
    code_generator_class = _CheckedConcat

    @staticmethod
    def checked_concat(parts) -> str:
        _tick()
        strs = [str(p) for p in parts]
        if sum(map(len, strs)) > MAX_VALUE_LEN:
            raise ChatTemplateError(f"the chat template concatenated a string of over {MAX_VALUE_LEN:,} characters")
        return "".join(strs)

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > MAX_INT_BITS or (right > 0 and left.bit_length() * right > MAX_INT_BITS):
                raise ChatTemplateError(f"the chat template computed {left!r} ** {right!r}, past the template limits")
        elif operator == "*":
            seq, n = (left, right) if _size(left) or isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(n, int) and isinstance(seq, (str, list, tuple)) and len(seq) * max(n, 0) > MAX_VALUE_LEN:
                raise ChatTemplateError(f"the chat template repeated a sequence {n!r} times, past the template limits")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise ChatTemplateError("the chat template multiplied integers past the template limits")
        elif operator == "+" and _size(left) + _size(right) > MAX_VALUE_LEN:
            raise ChatTemplateError(f"the chat template built a value of over {MAX_VALUE_LEN:,} items")
        elif operator == "%" and isinstance(left, str):
            _check_format_widths(left)
        return _check_size(super().call_binop(context, operator, left, right), f"result of {operator!r}")

    def call(self, context, obj, /, *args, **kwargs):
        _tick()
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, (str, list, tuple, dict)):  # a method of a value: 'x'.ljust(n), ','.join(xs) ...
            _precheck(getattr(obj, "__name__", "?"), owner, args, kwargs)
        return _check_size(super().call(context, obj, *args, **kwargs), "call result")

    def wrap_str_format(self, value):
        # str.format / format_map reach here as bound methods: check the widths before Jinja wraps them
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str):
            _check_format_widths(owner)
        return super().wrap_str_format(value)

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)


def _check_format_widths(fmt: str) -> None:
    import re

    if re.search(r"\d{5,}", fmt):
        raise ChatTemplateError("the chat template used a format string with a huge width or precision")


def _make_env() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], autoescape=False)
    for name in ("cycler", "joiner", "lipsum"):
        env.globals.pop(name, None)
    env.globals.update(range=_bounded_range, namespace=_CheckedNamespace, raise_exception=_raise_exception,
                       strftime_now=_strftime_now)
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, fn) for name, fn in env.filters.items()}
    env.tests = {name: _guard_filter(name, fn) for name, fn in env.tests.items()}
    return env


class ChatTemplate:
    """One engine's chat template, compiled once in the sandbox, rendered within the limits above."""

    def __init__(self, source: str):
        if not isinstance(source, str):
            raise ChatTemplateError(f"the chat template must be a string, got {type(source).__name__}")
        self._env = _make_env()
        token = _budget.set(_Budget(deadline=time.monotonic() + DEADLINE_S))
        try:  # compiling folds constants, which runs filters: the same limits apply
            self._template = self._env.from_string(source)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, SecurityError, RecursionError, MemoryError, ValueError, TypeError) as e:
            raise ChatTemplateError(f"the engine's chat template does not compile: {_describe(e)}. Re-export "
                                    "the engine directory from a checkpoint with a valid template.") from None
        finally:
            _budget.reset(token)

    def render(self, **variables) -> str:
        token = _budget.set(_Budget(deadline=time.monotonic() + DEADLINE_S))
        try:
            return "".join(self._stream(**variables))
        except (ChatTemplateError, GenerationError):
            raise
        except SecurityError as e:
            raise ChatTemplateError(f"the chat template tried something the sandbox refuses ({_describe(e)}); "
                                    "this engine directory's template is unsafe or broken") from None
        except RecursionError:
            raise ChatTemplateError("the chat template recursed without end") from None
        except MemoryError:
            raise ChatTemplateError("the chat template ran out of memory") from None
        except Exception as e:  # noqa: BLE001 -- any error inside untrusted template code is the template's
            raise ChatTemplateError(f"the chat template failed while rendering: {_describe(e)}") from None
        finally:
            _budget.reset(token)

    def _stream(self, **variables) -> Iterator[str]:
        b = _budget.get()
        for piece in self._template.generate(**variables):
            b.chars += len(piece)
            if b.chars > MAX_OUTPUT_CHARS:
                raise ChatTemplateError(f"the chat template produced over {MAX_OUTPUT_CHARS:,} characters")
            yield piece


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text[:300]!r}" if text else type(e).__name__
