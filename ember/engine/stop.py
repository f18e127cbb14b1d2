"""Stop conditions, checked after every appended token: EOS, stop token ids, stop strings, length.

A request's text grows here too (stop strings are found in it), through its incremental detokenizer.
"""

from __future__ import annotations

from ember.engine.request import FinishReason, Request


def check_stop(request: Request, token: int) -> FinishReason | None:
    """Called once `token` is appended to the request's outputs; the reason it finishes, or None."""
    new_chars = 0
    if request.detokenizer is not None:
        new_text = request.detokenizer.add(token)
        request.output_text += new_text
        new_chars = len(new_text)
    reason = _reason(request, token, new_chars)
    if reason is not None and request.detokenizer is not None and not isinstance(request.stop_reason, str):
        request.output_text += request.detokenizer.flush()  # text cut at a stop string needs nothing more
    return reason


def _reason(request: Request, token: int, new_chars: int) -> FinishReason | None:
    params = request.params
    if len(request.output_token_ids) >= params.min_tokens:
        if token in request.eos_token_ids and not params.ignore_eos:
            return FinishReason.STOP
        if token in params.stop_token_ids:
            request.stop_reason = token
            return FinishReason.STOP
        if _truncate_at_stop_string(request, new_chars):
            return FinishReason.STOP
    if request.num_tokens >= request.max_total_len:
        return FinishReason.LENGTH
    return None


def _truncate_at_stop_string(request: Request, new_chars: int) -> bool:
    params = request.params
    if not params.stop_strings or new_chars == 0:
        return False
    longest = max(len(s) for s in params.stop_strings)
    # Only a stop string ending in the new text can be new.
    search_from = max(0, len(request.output_text) - new_chars - longest + 1)
    for stop in params.stop_strings:
        found = request.output_text.find(stop, search_from)
        if found != -1:
            end = found + len(stop) if params.include_stop_str_in_output else found
            request.output_text = request.output_text[:end]
            request.stop_reason = stop
            return True
    return False
