"""ChatTemplates renders as the tokenizer does, within its size and time limits (no model needed)."""

from __future__ import annotations

import threading
import time

import pytest

from ember.server.chat_template import ChatTemplates, TemplateLimits
from ember.server.errors import FieldError
from ember.tokenizer import Tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi", "name": None}]
# Loops with loop.*, namespace, tojson, the generation tag, strftime_now, special tokens: what real templates use.
RICH = (
    "{% set ns = namespace(n=0) %}{{ bos_token }}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{{ loop.index }}:{{ m['role'] }}={{ m.content | tojson }}{% if 'name' in m %}!{% endif %}\n{% endfor %}"
    "{% generation %}{{ ns.n }}{% endgeneration %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}"
    "{{ strftime_now('%Y')|length }}{{ extra|default('-') }}"
)


@pytest.fixture(scope="module")
def tokenizer(checkpoint_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(checkpoint_dir("llama"))


def _templates(tokenizer: Tokenizer, max_chars: int = 1 << 20, timeout: float = 2.0) -> ChatTemplates:
    return ChatTemplates(tokenizer, TemplateLimits(max_chars, timeout))


@pytest.mark.parametrize("template", [None, RICH])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_the_tokenizer(tokenizer: Tokenizer, template: str | None, add_generation_prompt: bool) -> None:
    expected = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt, chat_template=template, extra="x")
    got = _templates(tokenizer).render(CONVERSATION, add_generation_prompt, template, {"extra": "x"})
    assert got == expected


def test_variables_cannot_replace_the_conversation(tokenizer: Tokenizer) -> None:
    got = _templates(tokenizer).render(CONVERSATION, True, "{{ messages|length }}", {"messages": []})
    assert got == "2"


def test_output_is_capped(tokenizer: Tokenizer) -> None:
    templates = _templates(tokenizer, max_chars=1000)
    assert len(templates.render(CONVERSATION, True, "{% for i in range(100) %}0123456789{% endfor %}")) == 1000
    with pytest.raises(FieldError, match="limits") as error:
        templates.render(CONVERSATION, True, "{% for i in range(101) %}0123456789{% endfor %}")
    assert error.value.param == "chat_template"


def test_the_models_own_template_failing_blames_the_messages(checkpoint_dir) -> None:
    strict = Tokenizer.from_pretrained(checkpoint_dir("llama"))  # its own copy: the template changes
    strict.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    with pytest.raises(FieldError, match="no system role") as error:
        _templates(strict).render(CONVERSATION, True)
    assert error.value.param == "messages"


def test_one_slow_render_does_not_limit_another(tokenizer: Tokenizer) -> None:
    """Budgets are per render: a render stuck in a loop in one thread leaves the others theirs."""
    templates = _templates(tokenizer, timeout=1.0)
    endless = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    failures: list[Exception] = []

    def stuck() -> None:
        try:
            templates.render(CONVERSATION, True, endless)
        except FieldError as e:
            failures.append(e)

    thread = threading.Thread(target=stuck)
    start = time.monotonic()
    thread.start()
    for _ in range(20):
        assert templates.render(CONVERSATION, True) == tokenizer.apply_chat_template(CONVERSATION)
    thread.join()
    assert len(failures) == 1 and "longer than 1 s" in str(failures[0])
    assert time.monotonic() - start < 30
