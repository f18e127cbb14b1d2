"""Offline batch generation: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine
from ember.errors import InvalidRequestError
from ember.outputs import RequestOutput
from ember.sampling_params import BeamSearchParams, SamplingParams
from ember.tokenizer import Tokenizer

PromptInput = str | Sequence[int] | dict[str, Any]


class LLM:
    """`LLM()` runs the default model (Gemma 3 270M, Q4_K_M GGUF); `LLM("path")` a GGUF file or HF folder.

    Keyword arguments are `EngineConfig` fields (dtype, device, max_model_len, max_num_seqs, ...).
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or {"prompt"/"prompt_token_ids": ...}); outputs in input order."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        # Validate every prompt before queueing any, so a bad one leaves no partial state behind.
        processed = [self.engine.process_prompt(_prompt_value(p)) for p in prompt_list]
        for params in params_list:  # grammars compile in parallel; add_request below waits for each
            if params.structured_outputs is not None:
                self.engine.structured.submit(params.structured_outputs)
        request_ids = []
        for prompt, params in zip(processed, params_list):
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, prompt, params)
            request_ids.append(request_id)
        return self._run(request_ids, use_tqdm)

    def beam_search(
        self, prompts: PromptInput | Sequence[PromptInput], params: BeamSearchParams, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """Beam search for every prompt, run inside the engine: the beams of a prompt share its KV blocks
        and batch with each other and with other requests. Each output holds `beam_width` hypotheses,
        best score first (`CompletionOutput.score`)."""
        processed = [self.engine.process_prompt(_prompt_value(p)) for p in _as_prompt_list(prompts)]
        request_ids = []
        for prompt in processed:
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, prompt, params)
            request_ids.append(request_id)
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = [
            tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template)
            for conv in conversations
        ]
        # The template already writes BOS where the model wants it.
        token_lists = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(token_lists, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[r] for r in request_ids]


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt of token ids
    return list(prompts)


def _prompt_value(prompt: PromptInput) -> str | Sequence[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt["prompt_token_ids"]
        if "prompt" in prompt:
            return prompt["prompt"]
        raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if not isinstance(prompt, (str, list, tuple)):
        raise InvalidRequestError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}")
    return prompt


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    if len(params) != count:
        raise InvalidRequestError(f"got {len(params)} sampling params for {count} prompts")
    return list(params)
