"""The OpenAI-compatible request bodies (plus vLLM's extras), validated strictly.

Unknown fields are ignored, as OpenAI does; a field of the wrong type is an error (strict mode: "5" is
not an integer). Every integer must fit in 64 bits and every number must be finite, so nothing the
engine cannot represent gets past the door. A known OpenAI or vLLM field that ember does not implement
is declared here and rejected unless it has its no-op value: a client must never believe a setting
took effect when it did not. Ranges are checked once, by SamplingParams, so the server and the offline
API agree.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Discriminator, Field, GetCoreSchemaHandler, GetJsonSchemaHandler,
    PrivateAttr, Tag, model_validator,
)
from pydantic_core import core_schema

from ember.errors import InvalidRequestError
from ember.sampling_params import BeamSearchParams, SamplingParams
from ember.server.errors import FieldError, blamed_name
from ember.server.tools import tool_call_constraint
from ember.structured.params import StructuredOutputsParams

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
# A prompt: text, a list of texts, token ids, or a list of token-id lists.
Prompt = str | list[str] | list[Int64] | list[list[Int64]]


def _prompt_list(prompt: Prompt, field: str) -> list[str | list[int]]:
    """A `Prompt` field as a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise FieldError(f"{field}: must not be empty", field)
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Unsupported:
    """Field metadata: reject the field unless it has one of its `no_op` values (which ask for nothing), and
    say so in the JSON schema, so clients and generated tests see what the server takes."""

    what: str
    no_op: tuple[Any, ...] = (None,)

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        return {"enum": list(self.no_op), "description": f"{self.what}: not supported by ember"}

    def _check(self, value: Any) -> Any:
        if value not in self.no_op:
            accepted = ", ".join(map(json.dumps, self.no_op))
            raise ValueError(f"{self.what} is not supported by ember (accepted: {accepted})")
        return value


_NOTHING = (None, [])  # an optional list that asks for nothing
_NO = (False,)


def _token_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's `{"token id as a string": bias}` as token ids."""
    if bias is None:
        return None
    ids = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 19:
            raise ValueError(f"keys must be token ids written as strings (e.g. \"42\"), got {key!r}")
        ids[int(key)] = value
    return ids


def _constraint_error(field: str, e: InvalidRequestError) -> FieldError:
    return FieldError(f"{field}: {str(e).removeprefix('structured outputs: ')}", field)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: Annotated[bool, _Unsupported("continuous_usage_stats", _NO)] = False


class TextFormat(_Body):
    type: Literal["text"]

    def params(self) -> StructuredOutputsParams | None:
        return None


class JsonObjectFormat(_Body):
    type: Literal["json_object"]

    def params(self) -> StructuredOutputsParams | None:
        return StructuredOutputsParams(json_object=True)


class JsonSchema(_Body):
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # strict or not, the output is held to the schema (as vLLM does)


class JsonSchemaFormat(_Body):
    type: Literal["json_schema"]
    json_schema: JsonSchema

    def params(self) -> StructuredOutputsParams | None:
        return StructuredOutputsParams(json=self.json_schema.schema_)


class TaggedSchema(_Body):
    begin: str
    schema_: dict[str, Any] = Field(alias="schema")
    end: str


class StructuralTagFormat(_Body):
    """vLLM's: an xgrammar structural tag (`format`), or the older `structures` and `triggers`: free text
    in which each `begin` (which starts with a trigger) is followed by JSON of its schema and `end`."""

    type: Literal["structural_tag"]
    format: dict[str, Any] | None = None
    structures: list[TaggedSchema] | None = None
    triggers: list[str] | None = None

    def params(self) -> StructuredOutputsParams | None:
        if self.format is not None:
            return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": self.format})
        if self.structures is None or self.triggers is None:
            raise FieldError("response_format: a structural_tag needs `format` (or `structures` and `triggers`)",
                             "response_format")  # fmt: skip
        tags = [{"type": "tag", "begin": s.begin, "content": {"type": "json_schema", "json_schema": s.schema_},
                 "end": s.end} for s in self.structures]  # fmt: skip
        triggered = {"type": "triggered_tags", "triggers": self.triggers, "tags": tags}
        return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": triggered})


_FORMATS: dict[str, type[_Body]] = {"text": TextFormat, "json_object": JsonObjectFormat,
                                    "json_schema": JsonSchemaFormat, "structural_tag": StructuralTagFormat}


def _format_tag(value: Any) -> str | None:
    """A response_format's model, by class name: error locations leave class names out, so a missing schema
    is `response_format.json_schema.schema`, not `response_format.json_schema.json_schema.schema`."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    model = _FORMATS.get(kind) if isinstance(kind, str) else None
    return model.__name__ if model else None


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("TextFormat")] | Annotated[JsonObjectFormat, Tag("JsonObjectFormat")]
    | Annotated[JsonSchemaFormat, Tag("JsonSchemaFormat")] | Annotated[StructuralTagFormat, Tag("StructuralTagFormat")],
    Discriminator(_format_tag, custom_error_type="response_format_type",
                  custom_error_message=f"type must be one of {', '.join(_FORMATS)}"),
]
# Sampling fields beam search does not take (at their defaults they ask for nothing).
_NOT_WITH_BEAM_SEARCH = ("top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                         "repetition_penalty", "logit_bias", "stop", "stop_token_ids", "min_tokens",
                         "skip_special_tokens", "logprobs")  # fmt: skip
# The fields that constrain the output; a request may set one.
_CONSTRAINT_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                      "guided_grammar")  # fmt: skip
Constraint = tuple[str, StructuredOutputsParams]  # the request's field, and what it asks for


class _SamplingFields(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: Int64 = 1
    temperature: Finite | None = None
    top_p: Finite | None = None
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    logit_bias: Annotated[dict[str, Finite] | None, AfterValidator(_token_bias)] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the provider's abuse monitoring: nothing to do here
    # vLLM's extras
    top_k: Int64 | None = None
    min_p: Finite | None = None
    repetition_penalty: Finite | None = None
    ignore_eos: bool = False
    min_tokens: Int64 = 0
    stop_token_ids: list[Int64] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    add_special_tokens: bool | None = None  # None: true for completions, false for chat (templates write BOS)
    # What the output must match (at most one of them; see `find_constraint`).
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's StructuredOutputsParams, by its names
    guided_json: str | dict[str, Any] | None = None  # vLLM's older names for the same
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: Annotated[str | None, _Unsupported(
        "guided_whitespace_pattern (use structured_outputs.disable_any_whitespace)")] = None
    # vLLM's beam search: n beams (best_of on completions), the n best hypotheses returned, best first.
    use_beam_search: bool = False
    length_penalty: Finite = 1.0
    early_stopping: bool | Literal["never"] = False
    # Known fields ember does not implement.
    prompt_logprobs: Annotated[Int64 | None, _Unsupported("prompt_logprobs (use echo with logprobs)")] = None
    bad_words: Annotated[list[str] | None, _Unsupported("bad_words", _NOTHING)] = None
    allowed_token_ids: Annotated[list[Int64] | None, _Unsupported("allowed_token_ids")] = None
    truncate_prompt_tokens: Annotated[Int64 | None, _Unsupported("truncate_prompt_tokens")] = None
    logits_processors: Annotated[list[Any] | None, _Unsupported("custom logits processors", _NOTHING)] = None
    priority: Annotated[Int64, _Unsupported("request priority", (0,))] = 0
    return_tokens_as_token_ids: Annotated[bool, _Unsupported("return_tokens_as_token_ids", _NO)] = False
    spaces_between_special_tokens: Annotated[bool, _Unsupported(
        "spaces_between_special_tokens false (decoding follows the tokenizer's own rules)", (True,))] = True

    _constraint: Constraint | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options: only allowed when stream is true", "stream_options")
        return self

    @model_validator(mode="after")
    def _resolve_constraint(self) -> _SamplingFields:
        self._constraint = self.find_constraint()
        return self

    @model_validator(mode="after")
    def _check_beam_search(self) -> _SamplingFields:
        """Beam search decides every token by the beams' summed log-probabilities: a field that shapes
        sampling, or asks for what a hypothesis does not carry, is an error rather than ignored."""
        if not self.use_beam_search:
            for name in ("length_penalty", "early_stopping"):
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise FieldError(f"{name}: only applies with use_beam_search", name)
            return self
        conflicts = self._beam_search_conflicts()
        if conflicts:
            raise FieldError(f"{conflicts[0]}: not supported with use_beam_search", conflicts[0])
        return self

    def _beam_search_conflicts(self) -> list[str]:
        """The fields set to something beam search cannot do."""
        fields = type(self).model_fields
        names = [name for name in _NOT_WITH_BEAM_SEARCH if getattr(self, name) != fields[name].default]
        if self._constraint is not None:
            names.append(self._constraint[0])
        return names

    def beam_search_params(self, max_tokens: int) -> BeamSearchParams:
        try:
            return BeamSearchParams(
                beam_width=self.beam_width, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                temperature=self.temperature if self.temperature is not None else 0.0,
                length_penalty=self.length_penalty, early_stopping=self.early_stopping,
            )  # fmt: skip
        except InvalidRequestError as e:
            raise self.blame(e, {"beam_width": None, "max_tokens": None, "temperature": None}) from e

    @property
    def beam_width(self) -> int:
        return self.n

    def find_constraint(self) -> Constraint | None:
        """The field that constrains the output, and how; None for free text. Two constraints are an error,
        not one silently winning."""
        found = [(name, params) for name in _CONSTRAINT_FIELDS if (params := self._constraint_of(name)) is not None]
        if len(found) > 1:
            names = " and ".join(name for name, _ in found)
            raise FieldError(f"{found[1][0]}: give at most one constraint on the output (got {names})", found[1][0])
        return found[0] if found else None

    def _constraint_of(self, name: str) -> StructuredOutputsParams | None:
        value = getattr(self, name)
        if value is None:
            return None
        try:
            if name == "response_format":
                return value.params()
            if name == "structured_outputs":
                return StructuredOutputsParams.from_dict(value)
            return StructuredOutputsParams(**{name.removeprefix("guided_"): value})
        except FieldError:
            raise
        except InvalidRequestError as e:
            raise _constraint_error(name, e) from e

    def _sampling(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None, n: int | None = None
    ) -> SamplingParams:
        values: dict[str, Any] = {
            "n": self.n if n is None else n,
            "stop": self.stop,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "stop_token_ids": self.stop_token_ids,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "logit_bias": self.logit_bias,
            "max_tokens": max_tokens,
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "structured_outputs": self._constraint[1] if self._constraint else None,
        }
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:  # null means the default, as in OpenAI's API
                values[name] = value
        try:
            return SamplingParams(**values)
        except InvalidRequestError as e:
            raise self.blame(e, values) from e

    def blame(self, e: InvalidRequestError, names: Collection[str]) -> FieldError:
        """`e` (a SamplingParams or engine check, which name parameters) as the error of this request's field."""
        if self._constraint is not None and str(e).startswith("structured outputs"):  # the grammar did not compile
            return _constraint_error(self._constraint[0], e)
        name = blamed_name(str(e), names)
        if name is None:
            return FieldError(str(e), None)
        field = self.field_for(name)
        return FieldError(str(e) if field == name else f"{field}: {e}", field)

    def field_for(self, parameter: str) -> str:
        """The request's field behind a SamplingParams (or BeamSearchParams) parameter."""
        return "n" if parameter == "beam_width" else parameter

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: Int64 | None = 16
    logprobs: Int64 | None = None
    echo: bool = False
    best_of: Int64 | None = None
    suffix: Annotated[str | None, _Unsupported("suffix (insertion)", (None, ""))] = None

    @model_validator(mode="after")
    def _check_combinations(self) -> CompletionRequest:
        if self.best_of is not None:
            if self.best_of < self.n:
                raise FieldError(f"best_of: must be at least n ({self.n}), got {self.best_of}", "best_of")
            if self.stream and self.best_of > self.n:
                raise FieldError("best_of: results cannot be streamed when best_of is greater than n", "best_of")
        if self.max_tokens == 0 and self.min_tokens:
            raise FieldError("min_tokens: must be 0 when max_tokens is 0", "min_tokens")
        if self.use_beam_search and self.max_tokens == 0:
            raise FieldError("max_tokens: must be at least 1 with use_beam_search", "max_tokens")
        return self

    @property
    def beam_width(self) -> int:
        return self.best_of if self.best_of is not None else self.n

    @property
    def selects(self) -> bool:
        """best_of > n: the server samples best_of completions and returns the n with the highest mean
        log-probability per token (OpenAI's rule)."""
        return self.best_of is not None and self.best_of > self.n

    @property
    def scores_prompt_only(self) -> bool:
        """OpenAI's `max_tokens: 0`: generate nothing (with echo and logprobs: score the prompt)."""
        return self.max_tokens == 0

    def sampling_params(self) -> SamplingParams:
        # The engine generates at least one token; with max_tokens 0 the server drops it.
        max_tokens = 1 if self.scores_prompt_only else self.max_tokens
        prompt_logprobs = self.logprobs if self.echo else None
        if not self.selects:
            return self._sampling(max_tokens, self.logprobs, prompt_logprobs)
        # The selection needs every completion's log-probability, asked for or not.
        logprobs = 0 if self.logprobs is None else self.logprobs
        return self._sampling(max_tokens, logprobs, prompt_logprobs, n=self.best_of)

    def field_for(self, parameter: str) -> str:
        if parameter in ("n", "beam_width") and self.best_of is not None:
            return "best_of"
        return super().field_for(parameter)

    def prompts(self) -> list[str | list[int]]:
        return _prompt_list(self.prompt, "prompt")


class TextPart(_Body):
    type: Literal["text"]
    text: str


def _parsed_arguments(arguments: str | dict[str, Any]) -> Any:
    """A tool call's arguments as the template wants them (an object; OpenAI sends them as JSON text)."""
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e})") from None


class FunctionCall(_Body):
    name: str
    arguments: Annotated[str | dict[str, Any], AfterValidator(_parsed_arguments)]


class MessageToolCall(_Body):
    """A call an assistant message made (sent back in the conversation with the call's result)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool's result: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (keys set to None are dropped when rendering)."""
        calls = [call.model_dump(exclude_none=True) for call in self.tool_calls] if self.tool_calls else None
        return {"role": self.role, "content": self.text(), "name": self.name or None, "tool_calls": calls,
                "tool_call_id": self.tool_call_id}  # fmt: skip


_FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"  # OpenAI's (a-z, A-Z, 0-9, _ and -, at most 64), and dots


class FunctionDefinition(_Body):
    name: Annotated[str, Field(pattern=_FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments (an object); None: any object
    strict: bool | None = None  # strict or not, calls forced by tool_choice hold to `parameters`


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class _ChatTemplateFields(_Body):
    """How a conversation becomes a prompt (vLLM's extras)."""

    tools: list[Tool] | None = None  # given to the chat template, which tells the model how to call them
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: Annotated[bool, _Unsupported("continue_final_message", _NO)] = False
    documents: Annotated[list[Any] | None, _Unsupported("documents", _NOTHING)] = None

    def template_variables(self) -> dict[str, Any]:
        """The template's variables besides the messages; chat_template_kwargs win, as in vLLM."""
        tools = [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None
        return {"tools": tools, **(self.chat_template_kwargs or {})}


def _conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [m.for_template() for m in messages]


class ChatCompletionRequest(_SamplingFields, _ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: Int64 | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool | None = None  # None: true
    # Known fields ember does not implement.
    functions: Annotated[list[Any] | None, _Unsupported("functions (deprecated: use tools)", _NOTHING)] = None
    function_call: Annotated[Any, _Unsupported("function_call (deprecated: use tool_choice)",
                                               (None, "none", "auto"))] = None  # fmt: skip
    modalities: Annotated[list[str] | None, _Unsupported("output modalities other than text", (None, ["text"]))] = None
    audio: Annotated[dict[str, Any] | None, _Unsupported("audio output")] = None
    prediction: Annotated[dict[str, Any] | None, _Unsupported("predicted outputs")] = None
    store: Annotated[bool | None, _Unsupported("store (stored completions)", (None, False))] = None
    metadata: dict[str, str] | None = None  # labels for stored completions; with store off, nothing to do
    reasoning_effort: Annotated[str | None, _Unsupported("reasoning_effort")] = None
    web_search_options: Annotated[dict[str, Any] | None, _Unsupported("web search")] = None
    service_tier: Annotated[str | None, _Unsupported("service tiers other than auto or default",
                                                     (None, "auto", "default"))] = None  # fmt: skip
    echo: Annotated[bool, _Unsupported("echo in chat completions", _NO)] = False

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs: requires logprobs to be true", "top_logprobs")
        return self

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    @property
    def tool_choice_mode(self) -> str:
        """none, auto, required or named."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice if isinstance(self.tool_choice, str) else "named"

    @property
    def called_tools(self) -> list[str] | None:
        """The names of the tools whose calls are read out of the output; None: the output is all content
        (with `none` the template still sees the tools, as in vLLM)."""
        if not self.tools or self.tool_choice_mode == "none":
            return None
        return [tool.function.name for tool in self.tools]

    def find_constraint(self) -> Constraint | None:
        """`required` and a named function constrain the output to calls (of any tool or of that one)."""
        found = super().find_constraint()
        functions = self._forced_functions()
        if functions is None:
            return found
        if found is not None:
            raise FieldError(f"{found[0]}: cannot be combined with tool_choice {self.tool_choice_mode}, which "
                             "constrains the output to tool calls", found[0])  # fmt: skip
        single = self.tool_choice_mode == "named" or self.parallel_tool_calls is False
        return "tools", tool_call_constraint([(f.name, f.parameters) for f in functions], single)

    def _forced_functions(self) -> list[FunctionDefinition] | None:
        """The functions the output must call (None: it need not call any), after checking the tool fields."""
        functions = [tool.function for tool in self.tools or []]
        names = [f.name for f in functions]
        duplicate = next((name for i, name in enumerate(names) if name in names[:i]), None)
        if duplicate is not None:
            raise FieldError(f"tools: more than one function is named {duplicate!r}", "tools")
        mode = self.tool_choice_mode
        if mode in ("none", "auto"):
            return None
        if not functions:
            raise FieldError(f"tool_choice: {mode} needs tools to call", "tool_choice")
        if mode == "required":
            return functions
        assert isinstance(self.tool_choice, NamedToolChoice)
        name = self.tool_choice.function.name
        if name not in names:
            raise FieldError(f"tool_choice: no function named {name!r} in tools (there are: {', '.join(names)})",
                             "tool_choice")  # fmt: skip
        return [functions[names.index(name)]]

    def field_for(self, parameter: str) -> str:
        if parameter == "logprobs":
            return "top_logprobs"
        if parameter == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return super().field_for(parameter)

    def conversation(self) -> list[dict[str, Any]]:
        return _conversation(self.messages)


class TokenizeRequest(_ChatTemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("give exactly one of `prompt` and `messages`", "prompt")
        return self

    def conversation(self) -> list[dict[str, Any]]:
        return _conversation(self.messages or [])


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Int64]


class EmbeddingRequest(_Body):
    model: str | None = None
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    add_special_tokens: bool = True
    dimensions: Annotated[Int64 | None, _Unsupported("dimensions (shortened embeddings)")] = None
    truncate_prompt_tokens: Annotated[Int64 | None, _Unsupported("truncate_prompt_tokens")] = None

    def inputs(self) -> list[str | list[int]]:
        return _prompt_list(self.input, "input")


class VerifyRequest(_Body):
    """Claims to verify against the served model: each a claim object as `ember verify` reads them
    (docs/verification.md), checked one by one."""

    model: str | None = None
    claims: Annotated[list[Any], Field(min_length=1, max_length=256)]
