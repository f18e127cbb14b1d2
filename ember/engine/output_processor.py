"""Turns a step's request updates into RequestOutputs: n > 1 completions gathered under the user's request
id, streamed text held back while it may still become a stop string, token strings for logprobs; a beam
search's hypotheses once its group is done."""

from __future__ import annotations

import time

from ember.engine.request import Request
from ember.engine.scheduler import RequestUpdate
from ember.engine.sequence_group import SequenceGroup
from ember.outputs import CompletionOutput, RequestMetrics, RequestOutput
from ember.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, list[Request]] = {}  # user request id -> its n sequences (a group: the first)
        self.groups: dict[str, SequenceGroup] = {}  # user request id -> its beam search
        self._emitted: dict[str, int] = {}  # chars of output_text already streamed, by sequence id

    def add(self, parent_id: str, children: list[Request]) -> None:
        self.requests[parent_id] = children
        for child in children:
            self._emitted[child.request_id] = 0

    def add_group(self, parent_id: str, group: SequenceGroup, first: Request) -> None:
        self.requests[parent_id] = [first]
        self.groups[parent_id] = group

    def pop(self, parent_id: str) -> list[Request]:
        """Forget the request; returns its live sequences."""
        children = self.requests.pop(parent_id, [])
        group = self.groups.pop(parent_id, None)
        if group is not None:
            return list(group.members)
        for child in children:
            self._emitted.pop(child.request_id, None)
        return children

    def process(self, updates: list[RequestUpdate]) -> list[RequestOutput]:
        touched: dict[str, None] = {}
        for update in updates:
            self._decode_logprobs(update)
            touched[update.request.parent_id] = None
        outputs = []
        for parent in touched:
            group = self.groups.get(parent)
            if group is not None:
                if group.result is not None:
                    outputs.append(self._group_output(parent, group))
            elif parent in self.requests:
                outputs.append(self._make_output(parent))
        return outputs

    def _group_output(self, parent_id: str, group: SequenceGroup) -> RequestOutput:
        first = self.requests[parent_id][0]
        self.pop(parent_id)
        assert group.result is not None
        completions = [
            CompletionOutput(
                index=rank,
                text=(text := self.tokenizer.decode(hypothesis.token_ids, skip_special_tokens=True)),
                token_ids=hypothesis.token_ids,
                cumulative_logprob=hypothesis.cumulative_logprob,
                finish_reason=hypothesis.finish_reason,
                score=hypothesis.score,
                delta_text=text,  # nothing was streamed before: the whole text is new
            )
            for rank, hypothesis in enumerate(group.result)
        ]
        return RequestOutput(
            request_id=parent_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=completions,
            finished=True,
            metrics=RequestMetrics(first.arrival_time, first.first_scheduled_time, first.first_token_time, time.monotonic()),
        )

    def _decode_logprobs(self, update: RequestUpdate) -> None:
        request = update.request
        if request.logprobs is None or not update.new_token_ids:
            return
        for entry in request.logprobs[len(request.logprobs) - len(update.new_token_ids) :]:
            for token_id, logprob in entry.items():
                logprob.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _make_output(self, parent_id: str) -> RequestOutput:
        children = self.requests[parent_id]
        first = children[0]
        completions = [self._completion(child) for child in children]
        finished = all(child.is_finished for child in children)
        if finished:
            self.pop(parent_id)
        return RequestOutput(
            request_id=parent_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=first.prompt_logprobs,
            metrics=RequestMetrics(
                arrival_time=first.arrival_time,
                first_scheduled_time=first.first_scheduled_time,
                first_token_time=first.first_token_time,
                finished_time=time.monotonic() if finished else None,
            ),
        )

    def _completion(self, request: Request) -> CompletionOutput:
        emitted = self._emitted.get(request.request_id, len(request.output_text))
        text = request.output_text
        visible = len(text)
        if not request.is_finished and request.params.stop_strings:
            # Hold back a tail that may turn out to be the start of a stop string.
            visible = max(emitted, len(text) - max(len(s) for s in request.params.stop_strings) + 1)
        self._emitted[request.request_id] = visible
        return CompletionOutput(
            index=request.index,
            text=text[:visible] if not request.is_finished else text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=request.cumulative_logprob,
            logprobs=request.logprobs,
            finish_reason=request.finish_reason.value if request.finish_reason else None,
            stop_reason=request.stop_reason,
            delta_text=text[emitted:visible] if not request.is_finished else text[emitted:],
            seed=request.seed,
        )
