"""Chat templates rendered within bounds: a render may take so long and produce so much, no more.

A chat template is code, and a request may bring its own (vLLM's `chat_template` field). The
tokenizer's sandbox stops it from touching the system, but not from looping for minutes or building a
gigabyte string; a server must stop that too. Rendering runs in a subclass of that same sandbox:

- time: every sandbox hook (attribute and item access, calls, intercepted operators) and every loop
  iteration (each `for` iterable is wrapped at compile time) checks the render's deadline;
- size: the output is streamed and counted, values passing through the hooks are size-checked, and the
  single operations that could build a huge value in one go (repetition, powers, padding and width
  arguments, `replace`, format widths) are checked before they run.

Any failure while rendering, a limit included, is the request's fault (its template or its messages).
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ember.server.errors import FieldError
from ember.tokenizer import Tokenizer, _compile_template

_TICK = "ember_tick"  # the filter wrapped around every loop's iterable
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_WIDTH_FILTERS = frozenset({"center", "indent", "wordwrap", "slice", "batch", "tojson", "truncate"})
_NUMBERS = re.compile(r"\d+")
_MAX_POWER_BITS = 1 << 16


@dataclass(frozen=True)
class TemplateLimits:
    max_chars: int
    """Longest rendered prompt (characters); also the largest value a template may build."""
    timeout: float
    """Seconds a render may take."""


class _LimitExceeded(Exception):
    pass


class _Budget:
    """What one render may still spend."""

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"rendering took longer than {self.limits.timeout:g} s")

    def size(self, value: Any) -> Any:
        if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > self.limits.max_chars:
            raise _LimitExceeded(f"a value of more than {self.limits.max_chars} items")
        return value

    def amount(self, n: Any) -> None:
        """An integer that sets how big a result gets (a width, a repetition count)."""
        if isinstance(n, int) and abs(n) > self.limits.max_chars:
            raise _LimitExceeded(f"a size argument of {n}")

    def growth(self, text: Any, old: Any, new: Any) -> None:
        """Before text.replace(old, new)."""
        if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
            count = len(text) + 1 if not old else len(text) // len(old)
            self.size_of(len(text) + count * len(new))

    def widths(self, fmt: Any) -> None:
        """Before formatting with `fmt`: no field wider than the output may be."""
        if isinstance(fmt, str):
            for number in _NUMBERS.findall(fmt):
                self.amount(int(number) if len(number) < 20 else 1 << 64)

    def size_of(self, length: int) -> None:
        if length > self.limits.max_chars:
            raise _LimitExceeded(f"a value of {length} characters")


class _TickingCodeGenerator(CodeGenerator):
    """Compiles every `for` loop to iterate through the tick filter, so even an empty loop body checks
    the deadline."""

    def visit_Template(self, node: nodes.Template, frame: Any = None) -> None:
        for loop in node.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _TICK, [], [], None, None, lineno=loop.iter.lineno)
        super().visit_Template(node, frame)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The tokenizer's sandbox, with each render's budget checked in the hooks. The budget is per thread
    (renders run in a thread pool, several at once)."""

    code_generator_class = _TickingCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, base: jinja2.Environment) -> None:
        super().__init__(trim_blocks=base.trim_blocks, lstrip_blocks=base.lstrip_blocks,
                         extensions=[type(e) for e in base.extensions.values()])  # fmt: skip
        self.globals.update(base.globals)
        self.filters.update(base.filters)
        for name in _WIDTH_FILTERS | {"replace", "format"}:
            self.filters[name] = self._bounded_filter(name, self.filters[name])
        self.filters[_TICK] = self._tick_iterable
        self.render_state = threading.local()

    @property
    def budget(self) -> _Budget:
        return self.render_state.budget

    @jinja2.pass_context  # never folded at compile time: a loop's iterable is wrapped at run time
    def _tick_iterable(self, _: Any, iterable: Iterable[Any]) -> Iterator[Any]:
        budget = self.budget
        for item in iterable:
            budget.tick()
            yield item

    def _bounded_filter(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)  # keeps jinja's pass_context/pass_eval_context marks
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self._before(name, args, kwargs, _WIDTH_FILTERS)
            return self.budget.size(f(*args, **kwargs))

        return bounded

    def _before(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], width_names: frozenset[str]) -> None:
        budget = self.budget
        budget.tick()
        values = [*args, *kwargs.values()]
        if name in width_names:
            for value in values:
                budget.amount(value)
        strings = [v for v in values if isinstance(v, str)]
        if name == "replace" and len(strings) >= 3:
            budget.growth(*strings[:3])
        if name == "format" and strings:
            budget.widths(strings[0])

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        method_of = getattr(__obj, "__self__", None)
        if isinstance(method_of, str):
            __self._before(__obj.__name__, (method_of, *args), kwargs, _WIDTH_METHODS)
        else:
            __self.budget.tick()
        return __self.budget.size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:  # `"{:99999999}".format(x)`: the widths are in the string
            self.budget.widths(value.__self__)
        return wrapped

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.budget.tick()
        return self.budget.size(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.budget.tick()
        return self.budget.size(super().getitem(obj, argument))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = self.budget
        budget.tick()
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                    budget.size_of(len(sequence) * count)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(right) * max(abs(left).bit_length() - 1, 0) > _MAX_POWER_BITS:
                raise _LimitExceeded(f"{left} ** {right} is too large")
        elif operator == "%":
            budget.widths(left)
        return budget.size(super().call_binop(context, operator, left, right))


class ChatTemplates:
    """Renders conversations to prompt text as `Tokenizer.apply_chat_template` does (same sandbox,
    options, helpers and variables), within `limits`. Safe to call from several threads at once."""

    _CACHED_TEMPLATES = 32  # requests may each bring a template: keep only the recent ones compiled

    def __init__(self, tokenizer: Tokenizer, limits: TemplateLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        # The tokenizer's own environment supplies the options, filters and globals.
        self.env = _BoundedEnvironment(_compile_template("").environment)
        self._compile = functools.lru_cache(self._CACHED_TEMPLATES)(self.env.from_string)

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, chat_template: str | None = None,
        variables: dict[str, Any] | None = None,
    ) -> str:
        """Prompt text; FieldError naming `chat_template` (the request's) or `messages` (the model's)."""
        param = "chat_template" if chat_template else "messages"
        source = chat_template or self.tokenizer.chat_template
        if source is None:
            raise FieldError("this model has no chat template (none in its tokenizer files): use a plain prompt "
                             "or give chat_template", "messages")  # fmt: skip
        try:
            template = self._compile(source)
        except jinja2.TemplateSyntaxError as e:
            raise FieldError(f"chat_template: not valid jinja2: {e}", param) from e
        # As transformers: keys set to None are dropped (templates test for presence, not for None).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {"tools": None, "documents": None, **self.tokenizer.special_tokens, **(variables or {}),
                   "messages": messages, "add_generation_prompt": add_generation_prompt}  # fmt: skip
        self.env.render_state.budget = _Budget(self.limits)
        try:
            return self._generate(template, context)
        except _LimitExceeded as e:
            raise FieldError(f"{param}: the chat template exceeds the server's limits: {e}", param) from e
        except Exception as e:  # the template (or its input) failed: TemplateError, TypeError, RecursionError...
            raise FieldError(f"{param}: chat template error: {type(e).__name__}: {e}", param) from e
        finally:
            del self.env.render_state.budget

    def _generate(self, template: jinja2.Template, context: dict[str, Any]) -> str:
        budget = self.env.budget
        parts: list[str] = []
        length = 0
        for part in template.generate(**context):
            length += len(part)
            budget.size_of(length)
            budget.tick()
            parts.append(part)
        return "".join(parts)
