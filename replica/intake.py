"""Request intake: a prompt and its parameters become a validated ``Request`` before any engine
work, or a refusal (``InvalidRequestError``, ``RequestTooLongError``) with nothing changed.

It tokenizes, checks token ids against the model's vocabulary and the length against the
admission limits, forks an n > 1 request into its choices, compiles a structured-output grammar
(cached per spec: never in the step loop) and shares one prompt-logprobs list among the choices.
It reads only what does not change while the engine runs, so ``AsyncEngine`` calls it on the
event loop while the step thread steps.
"""

from __future__ import annotations

import operator
import time
from typing import TYPE_CHECKING

from replica.errors import InvalidRequestError
from replica.grammar import GrammarCache
from replica.interfaces import Prompt
from replica.outputs import TokenLogprobs
from replica.request import Request, SamplingParams

if TYPE_CHECKING:
    from replica.admission import AdmissionController
    from replica.tokenizer import Tokenizer


class RequestIntake:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, admission: AdmissionController) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.admission = admission
        self._grammars: GrammarCache | None = None  # built at the first structured-output request

    def make(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> Request:
        """The validated request; raises InvalidRequestError / RequestTooLongError."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string", param="request_id")
        req = Request(
            request_id=request_id,
            prompt_token_ids=self._token_ids(prompt),
            params=params,
            arrival_time=time.monotonic(),
            eos_token_ids=frozenset(self.tokenizer.eos_token_ids),
        )
        self.admission.check_fits(req)
        req.make_children()
        if params.guided is not None:
            for seq in req.children or (req,):  # each choice its own matcher
                seq.grammar = self.grammars.state(params.guided)
        if params.prompt_logprobs is not None:
            # Nothing predicts the first prompt token. One list for the request and its choices:
            # they score the same prompt, whichever computes a position first fills it in.
            shared: list[TokenLogprobs | None] = [None]
            for seq in (req, *req.children):
                seq.prompt_logprobs = shared
        return req

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            try:
                # operator.index, not int(): a float or a numeric string is not a token id.
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise InvalidRequestError(
                    "prompt must be a string or a list of integer token ids", param="prompt"
                ) from None
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"prompt token ids must be in [0, {self.vocab_size}), got {bad[0]}", param="prompt"
                )
        if not ids:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        return ids

    @property
    def grammars(self) -> GrammarCache:
        """The structured-output compiler of this tokenizer and model vocabulary."""
        if self._grammars is None:
            hf = getattr(self.tokenizer, "hf", None)
            if hf is None:
                raise InvalidRequestError("structured output needs a Hugging Face tokenizer", param="response_format")
            self._grammars = GrammarCache(hf, self.vocab_size, self.tokenizer.eos_token_ids)
        return self._grammars
