"""Web app: `python -m qlora_lab pipeline=web [run_dir=RUN] [web.host=...] [web.port=...]`

Four pages in one Gradio app, served on web.host:web.port (this machine only by default) until Ctrl-C:
  Chat          streamed replies from a run in any inference mode, the history rendered as in training and
                chat
  Side by side  one prompt, two inference modes (base vs fine-tuned by default), with time to first token
                and tokens/s
  Runs          the runs under paths.output_dir; one run's config, metrics.json, evaluation table and loss
                curve
  Sweeps        a sweep's decision card (decision.md + decision.png), summary.md tables and plots

Gradio rather than Streamlit: a Gradio event handler that is a Python generator streams each yield to the page
(Streamlit reruns the whole script on every interaction), and Gradio apps start inside this process, on the
config this job already composed, with no second command line. Loaded models are kept by run and mode within a
memory budget (ModelCache).

On a shared machine the app is safe by default: it answers only under the names it is served at (Guard: no DNS
rebinding), refuses state-changing requests from other origins and all uploads, lets the page load no remote
image, serves only runs under its roots (paths.output_dir and run_dir's parent) with the job's own
trust_remote_code, and asks for a login (web.auth) whenever web.host is not a loopback address.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from queue import Queue
from urllib.parse import urlsplit

os.environ.setdefault(
    "GRADIO_ANALYTICS_ENABLED", "False"
)  # no usage reports, no version check on the network

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from starlette.datastructures import Headers, MutableHeaders  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList, set_seed  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from .. import web_pages  # noqa: E402
from ..config import Config, ConfigError, GenerationConfig, InferenceMode  # noqa: E402
from ..inference import context_length, conversation_ids, hf_generation_config, load_for_inference  # noqa: E402
from ..layout import RunLayout  # noqa: E402
from ..rundir import Run, inherit_from_run  # noqa: E402
from ..validation import is_loopback  # noqa: E402

log = logging.getLogger(__name__)
NO_RUN = "(no run: the base model)"


# ---------------------------------------------------------------- loaded models


@dataclass
class Loaded:
    key: tuple[str, str]  # (run folder or "", inference mode)
    model: object
    tokenizer: object
    cfg: Config  # the run's config: its model, quantization and dataset template
    load_s: float
    bytes: int  # the model's weights and buffers


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def default_budget() -> int:
    """Half the memory models load into: the first GPU's, else this machine's RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class ModelCache:
    """The models the page loaded, by (run, mode), so that side by side and switching back need no reload. The
    least recently used go first when the next one would not fit in `budget` bytes (the newest is always
    kept). `lock` is held by whoever loads or generates, so that a model is never dropped from under a running
    generation."""

    def __init__(self, cfg: Config, source: Path | None, budget: int | None = None):
        self.cfg, self.source = cfg, source  # the job's config and run (run_dir=), if any
        self.budget = default_budget() if budget is None else budget
        self.loaded: OrderedDict[tuple[str, str], Loaded] = OrderedDict()
        self.lock = threading.Lock()

    def run_config(self, run_dir: Path | None) -> Config:
        """The config a run was trained with (model, quantization, lora, dataset, train), on this job's
        settings. trust_remote_code is always the job's own: a browsed run's saved config cannot turn it
        on."""
        if run_dir is None or run_dir == self.source:
            return self.cfg
        cfg = inherit_from_run(self.cfg, run_dir, [])[0]
        cfg.model.trust_remote_code = self.cfg.model.trust_remote_code
        return cfg

    @staticmethod
    def key(run_dir: Path | None, mode: str) -> tuple[str, str]:
        return str(run_dir or ""), InferenceMode(mode).value

    def to_drop(self, key: tuple[str, str]) -> list[tuple[str, str]]:
        """The models that loading `key` unloads, oldest first. Its size is guessed from a held model of the
        same run, else the largest held one."""
        if key in self.loaded:
            return []
        same_run = [m.bytes for k, m in self.loaded.items() if k[0] == key[0]]
        need = max(same_run or [m.bytes for m in self.loaded.values()] or [0])
        held, drop = sum(m.bytes for m in self.loaded.values()), []
        for k, m in self.loaded.items():
            if held + need <= self.budget:
                break
            drop.append(k)
            held -= m.bytes
        return drop

    def get(self, run_dir: Path | None, mode: str) -> Loaded:
        key = self.key(run_dir, mode)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        if run_dir is None and key[1] != InferenceMode.base.value:
            raise ConfigError(f"inference mode {key[1]} needs a run; pick a run, or the base mode.")
        cfg = self.run_config(run_dir)
        for k in self.to_drop(key):
            del self.loaded[k]
        self.free()
        t0 = time.perf_counter()
        model, tokenizer = load_for_inference(cfg, run_dir or Path("."), key[1])
        self.loaded[key] = Loaded(key, model, tokenizer, cfg, time.perf_counter() - t0, model_bytes(model))
        return self.loaded[key]

    @staticmethod
    def free() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- streaming


class _TokenStreamer(BaseStreamer):
    """Hands the answer so far to the reading thread after every new token, and times the first one.
    (TextIteratorStreamer holds text back until a space, which Chinese text or a random test model may never
    write.)"""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prompt_seen = False
        self.first_token_at: float | None = None
        self.texts: Queue = Queue()

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # not in the middle of a multi-byte character
            self.texts.put(text)

    def end(self):
        self.texts.put(None)

    def __iter__(self):
        while (text := self.texts.get(timeout=600)) is not None:
            yield text


class _StopWhenSet(StoppingCriteria):
    """Ends generate() at the next token once the event is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def stream_reply(
    loaded: Loaded, ids, gen: GenerationConfig, stop: threading.Event | None = None, every_s: float = 0.1
) -> Iterator[tuple[str, dict]]:
    """Yields (the answer so far, stats) while generate() runs in a thread, at most once every `every_s`
    seconds (a page sent every token of a fast model falls behind it), then the whole answer; stats:
    new_tokens, ttft_s, seconds, tokens_per_s (new tokens ÷ the answer's wall time), stopped. An error inside
    generate() is raised here.

    Setting `stop` ends the answer early (the Stop button). Closing this generator (the page cancelled the
    event, or its client went away) stops generate() too and waits for its thread, so no model runs for
    nobody."""
    model, tokenizer = loaded.model, loaded.tokenizer
    config = hf_generation_config(gen, tokenizer)
    streamer = _TokenStreamer(tokenizer)
    device = next(model.parameters()).device
    failure: list[BaseException] = []
    stop = stop or threading.Event()

    def work():
        try:
            with torch.no_grad():
                model.generate(
                    input_ids=ids.to(device),
                    attention_mask=torch.ones_like(ids).to(device),
                    generation_config=config,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                )
        except BaseException as e:  # noqa: B036 - handed to the page's thread, which shows it
            failure.append(e)
            streamer.end()  # unblock the reader

    t0 = time.perf_counter()
    thread = threading.Thread(target=work, daemon=True, name="web-generate")
    thread.start()
    text = ""  # no new token at all: an empty answer

    def stats() -> dict:
        seconds = time.perf_counter() - t0
        ttft = streamer.first_token_at - t0 if streamer.first_token_at else None
        return {
            "new_tokens": len(streamer.tokens),
            "ttft_s": ttft,
            "seconds": seconds,
            "tokens_per_s": len(streamer.tokens) / seconds if seconds > 0 else 0.0,
            "stopped": stop.is_set(),
        }

    finished, shown_at = False, 0.0
    try:
        for text in streamer:
            if time.perf_counter() - shown_at >= every_s:
                shown_at = time.perf_counter()
                yield text, stats()
        finished = True
    finally:
        if not finished:  # closed mid-answer: nobody reads it any more
            stop.set()
        thread.join()
        if stop.is_set():
            log.info(
                "web app: generation stopped after %d new tokens (%s)",
                len(streamer.tokens),
                "stop button" if finished else "cancelled or the page went away",
            )
    if failure:
        raise failure[0]
    yield text.strip(), stats()


def stats_line(stats: dict) -> str:
    ttft = f"{stats['ttft_s']:.2f} s" if stats["ttft_s"] is not None else "–"
    stopped = "stopped: " if stats["stopped"] else ""
    return (
        f"{stopped}{stats['new_tokens']} tokens in {stats['seconds']:.2f} s: "
        f"**{stats['tokens_per_s']:.1f} tokens/s**, time to first token **{ttft}**"
    )


def progress_line(stats: dict) -> str:
    return f"generating: {stats['new_tokens']} tokens so far"


def generation_settings(
    base: GenerationConfig,
    sampling: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: int,
    repetition_penalty: float,
) -> GenerationConfig:
    """The generation group with the page's values; the page's controls keep each in its valid range."""
    return replace(
        base,
        do_sample=bool(sampling),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        max_new_tokens=int(max_new_tokens),
        repetition_penalty=float(repetition_penalty),
    )


# ---------------------------------------------------------------- what the page shows

_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~&$:@])")  # `:` `.` `@`: no autolinked URL
_CODE = re.compile(r"(```.*?(?:```|\Z)|`[^`\n]*`)", re.S)  # a fence still open while streaming counts as code


def as_typed(text: str) -> str:
    """A user's message as Markdown that shows exactly the text typed: every Markdown and HTML character
    escaped."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", text)


def as_reply(text: str) -> str:
    """A model's reply as Markdown without raw HTML or images (which the browser would fetch from anywhere);
    code spans and blocks are left as written (Markdown shows them as text)."""
    parts = _CODE.split(text)
    return "".join(p if i % 2 else p.replace("<", "&lt;").replace("![", "!\\[") for i, p in enumerate(parts))


def shown(messages: list[dict]) -> list[dict]:
    """The chat history as the page shows it (the history kept for the model stays as typed and generated)."""
    return [
        {"role": m["role"], "content": (as_typed if m["role"] == "user" else as_reply)(m["content"])}
        for m in messages
    ]


# ---------------------------------------------------------------- the server's guard

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSP = "img-src 'self' data: blob:; media-src 'self' data: blob:; frame-ancestors 'self'"


def served_names(host: str) -> frozenset[str]:
    """The Host names the app answers to: loopback, web.host, and on a wildcard address this machine's
    names."""
    names = {"127.0.0.1", "localhost", "::1", host.lower().strip("[]")}
    if host in ("0.0.0.0", "::", ""):
        hostname = socket.gethostname()
        names |= {hostname.lower(), socket.getfqdn().lower()}
        try:
            names |= {info[4][0].lower() for info in socket.getaddrinfo(hostname, None)}
        except OSError:
            pass
    return frozenset(names)


def host_name(host_header: str) -> str:
    """`127.0.0.1:7860` -> `127.0.0.1`, `[::1]:7860` -> `::1`."""
    return (urlsplit(f"//{host_header}").hostname or "").lower()


class Guard:
    """ASGI middleware in front of Gradio's app. Refuses a Host this app is not served under (400: a page on a
    name that resolves here, i.e. DNS rebinding), a state-changing request from another origin (403: a page on
    another site posting to it), and uploads (403: the app has no upload component). Every page it serves may
    load images only from itself (CSP), so a message or reply cannot make the browser fetch a remote image."""

    def __init__(self, app, names: frozenset[str]):
        self.app, self.names = app, names

    def refusal(self, scope) -> tuple[int, str] | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if host_name(host) not in self.names:
            return 400, f"Host {host!r} is not served here: open the app at the address it printed."
        if scope["path"].rstrip("/").endswith("/gradio_api/upload"):
            return 403, "This app takes no uploads."
        if scope.get("method", "GET") not in SAFE_METHODS or scope["type"] == "websocket":
            origin = headers.get("origin")
            if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
                return 403, f"A request from {origin} is refused: open the app at the address it printed."
            if origin is None and headers.get("sec-fetch-site") in ("cross-site", "same-site"):
                return 403, "A request from another site is refused."
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if refused := self.refusal(scope):
            log.warning(
                "web app: refused %s %s (%s)", scope.get("method", "websocket"), scope["path"], refused[1]
            )
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await PlainTextResponse(refused[1], status_code=refused[0])(scope, receive, send)

        async def send_with_policy(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("Content-Security-Policy", CSP)
            await send(message)

        await self.app(scope, receive, send_with_policy)


# ---------------------------------------------------------------- the app


@dataclass
class Turn:
    """One answer being generated for one page: Stop sets `stop`; Reset also sets `discarded` (no more
    output)."""

    stop: threading.Event = field(default_factory=threading.Event)
    discarded: bool = False


def too_long_line(prompt_tokens: int, max_new_tokens: int, context: int) -> str:
    return (
        f"**not sent:** the message is {prompt_tokens} tokens, and with max new tokens {max_new_tokens} that "
        f"is more than the model's context of {context} tokens; shorten it, or lower max new tokens."
    )


@dataclass
class AppState:
    """What the pages share: the job's config, the runs the app may serve, the loaded models and the answers
    being generated (one per session and page)."""

    cfg: Config
    source: Path | None
    output_dir: Path = field(init=False)
    roots: list[Path] = field(
        init=False
    )  # the app serves only runs under these: never a path typed into the page
    cache: ModelCache = field(init=False)
    gen0: GenerationConfig = field(init=False)  # the job's generation settings, the pages' starting values
    turns: dict[tuple[str, str], Turn] = field(
        default_factory=dict
    )  # (session, page) -> the answer generated there

    def __post_init__(self):
        cfg = self.cfg
        self.output_dir = Path(cfg.paths.output_dir).resolve()
        self.source = self.source.resolve() if self.source is not None else None
        self.roots = [self.output_dir] + (
            [self.source.parent]
            if self.source is not None and not self.source.is_relative_to(self.output_dir)
            else []
        )
        self.cache = ModelCache(cfg, self.source)
        self.gen0 = (
            GenerationConfig(**OmegaConf.to_container(cfg.generation))
            if OmegaConf.is_config(cfg.generation)
            else cfg.generation
        )

    def run_name(self, path: Path) -> str:
        """A run's name in the page: its folder relative to output_dir (where the Runs page lists it)."""
        return (
            path.relative_to(self.output_dir).as_posix()
            if path.is_relative_to(self.output_dir)
            else str(path)
        )

    def run_choices(self) -> list[str]:
        names = [self.run_name(self.source)] if self.source is not None else []
        for root in self.roots:
            names += [
                self.run_name(root / r["run"])
                for r in web_pages.runs_table(root)
                if "train" in r["stages"].split(",")
            ]
        return [NO_RUN] + list(dict.fromkeys(names))

    def run_path(self, choice: str | None) -> Path | None:
        """The run folder of a name from the list; a ConfigError for anything else (a typed or posted
        path)."""
        if not choice or choice == NO_RUN:
            return None
        path = Path(choice)
        path = (path if path.is_absolute() else self.output_dir / path).resolve()
        if not any(path.is_relative_to(root) for root in self.roots) or not RunLayout(path).config.is_file():
            raise ConfigError(
                f"{choice!r} is not a run under {' or '.join(map(str, self.roots))}; pick a run from "
                f"the list."
            )
        return path

    def modes_for(self, choice: str | None) -> list[str]:
        try:
            return web_pages.inference_modes(self.run_path(choice))
        except ConfigError:
            return [InferenceMode.base.value]

    def describe(self, key: tuple[str, str]) -> str:
        run_dir, mode = key
        return f"the {mode} model" + (
            f" of {self.run_name(Path(run_dir))}" if run_dir else f" ({self.cfg.model.name_or_path})"
        )

    def loading_line(self, run_dir: Path | None, mode: str) -> str | None:
        """What the page says while a model loads; None when the one asked for is already loaded."""
        key = self.cache.key(run_dir, mode)
        if key in self.cache.loaded:
            return None
        drop = self.cache.to_drop(key)
        unload = f" (unloading {' and '.join(map(self.describe, drop))} to make room)" if drop else ""
        return f"loading {self.describe(key)}{unload} ..."

    def loaded_line(self, loaded: Loaded) -> str:
        return f"{self.describe(loaded.key)}, loaded in {loaded.load_s:.1f} s"

    @staticmethod
    def error_line(e: BaseException) -> str:
        log.exception("web app: generation failed")
        return f"**error:** {type(e).__name__}: {e}"

    def new_turn(self, request: gr.Request, page: str) -> Turn:
        turn = self.turns[request.session_hash, page] = Turn()
        return turn

    def stop_turn(self, request: gr.Request, page: str, discard: bool = False) -> None:
        log.info("web app: %s asked on the %s page", "reset" if discard else "stop", page)
        if turn := self.turns.get((request.session_hash, page)):
            turn.discarded = turn.discarded or discard
            turn.stop.set()


@dataclass
class Controls:
    """The controls above the pages that the Chat and Side by side pages read."""

    run_box: gr.Dropdown
    system_box: gr.Textbox
    settings: (
        list  # sampling, temperature, top-k, top-p, max new tokens, repetition penalty (generation_settings)
    )


def header(state: AppState, start_choice: str) -> tuple[Controls, gr.Button]:
    """The run picker and the accordion of system prompt and generation settings; returns them and ↻ runs."""
    gen0 = state.gen0
    with gr.Row(equal_height=True):
        gr.Markdown("## QLoRA Lab", scale=0, min_width=160)
        run_box = gr.Dropdown(
            state.run_choices(), value=start_choice, label="run", scale=3, elem_id="run-select"
        )
        refresh_runs = gr.Button("↻ runs", scale=0, elem_id="run-refresh")
    with gr.Accordion("System prompt and generation settings", open=False, elem_id="settings"):
        system_box = gr.Textbox(
            state.cfg.dataset.system_prompt or "", label="system prompt", lines=2, elem_id="system-prompt"
        )
        with gr.Row():
            sampling = gr.Checkbox(gen0.do_sample, label="sampling (off: greedy)")
            temperature = gr.Slider(
                0.05, 2.0, value=max(gen0.temperature, 0.05), step=0.05, label="temperature"
            )
            top_k = gr.Slider(0, 200, value=gen0.top_k, step=1, label="top-k (0: off)")
            top_p = gr.Slider(0.05, 1.0, value=gen0.top_p, step=0.05, label="top-p")
        with gr.Row():
            max_new = gr.Slider(
                1, 1024, value=gen0.max_new_tokens, step=1, label="max new tokens", elem_id="max-new-tokens"
            )
            repetition = gr.Slider(
                1.0, 2.0, value=max(gen0.repetition_penalty, 1.0), step=0.05, label="repetition penalty"
            )
    return Controls(
        run_box, system_box, [sampling, temperature, top_k, top_p, max_new, repetition]
    ), refresh_runs


def chat_page(state: AppState, controls: Controls, start_modes: list[str], start_mode: str) -> gr.Dropdown:
    """The Chat page: a conversation with one run in one inference mode, streamed; returns its mode picker."""
    cache, gen0 = state.cache, state.gen0
    with gr.Row(equal_height=True):
        chat_mode = gr.Dropdown(
            start_modes, value=start_mode, label="inference mode", scale=1, elem_id="chat-mode"
        )
        chat_status = gr.Markdown("", elem_id="chat-status")
    # user text shown as typed and replies without HTML or images: see shown()
    chatbot = gr.Chatbot(label="conversation", elem_id="chat-history", height=300)
    with gr.Row():
        message = gr.Textbox(
            placeholder="Type a message and press Enter", show_label=False, scale=5, elem_id="chat-input"
        )
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
        reset = gr.Button("Reset", scale=1, elem_id="chat-reset")
    history = gr.State([])  # the conversation as typed and generated: what the model sees

    def respond(
        text,
        messages,
        choice,
        mode,
        system,
        sampling,
        temperature,
        top_k,
        top_p,
        max_new,
        repetition,
        request: gr.Request,
    ):
        text = (text or "").strip()
        if not text:
            yield "", gr.skip(), messages, gr.skip()
            return
        turn = state.new_turn(request, "chat")
        messages = messages + [{"role": "user", "content": text}]
        yield "", shown(messages + [{"role": "assistant", "content": ""}]), messages, "…"
        with cache.lock:
            if turn.discarded:  # reset while waiting for another page's answer
                return
            try:
                run_dir = state.run_path(choice)
                if line := state.loading_line(run_dir, mode):
                    yield gr.skip(), gr.skip(), gr.skip(), line
                loaded = cache.get(run_dir, mode)
                status = state.loaded_line(loaded)
                gen = generation_settings(gen0, sampling, temperature, top_k, top_p, max_new, repetition)
                prompt = [{"role": "system", "content": system}] if system.strip() else []
                max_len = context_length(loaded.model)
                ids, kept = conversation_ids(
                    prompt + messages, loaded.tokenizer, loaded.cfg.dataset, gen.max_new_tokens, max_len
                )
                if ids.shape[1] + gen.max_new_tokens > max_len:
                    yield (
                        text,
                        shown(messages[:-1]),
                        messages[:-1],
                        too_long_line(ids.shape[1], gen.max_new_tokens, max_len),
                    )
                    return
                dropped = len(prompt) + len(messages) - len(kept)
                note = (
                    (
                        f" · the oldest {dropped} messages no longer fit the context ({max_len} tokens) "
                        f"and were left out of the prompt"
                    )
                    if dropped
                    else ""
                )
                with closing(stream_reply(loaded, ids, gen, turn.stop)) as stream:
                    for answer, stats in stream:
                        if turn.discarded:
                            return
                        # gr.skip(): the box keeps what the user types next while this answer streams
                        yield (
                            gr.skip(),
                            shown(messages + [{"role": "assistant", "content": answer}]),
                            gr.skip(),
                            f"{status} · {progress_line(stats)}{note}",
                        )
                if turn.discarded:
                    return
                messages = messages + [{"role": "assistant", "content": answer}]
                yield gr.skip(), shown(messages), messages, f"{status} · {stats_line(stats)}{note}"
            except Exception as e:  # the page shows it; the app keeps serving
                if not turn.discarded:  # the message back, to retry
                    yield text, shown(messages[:-1]), messages[:-1], state.error_line(e)

    def reset_chat(request: gr.Request):
        state.stop_turn(request, "chat", discard=True)
        return [], [], "history cleared"

    chat_inputs = [message, history, controls.run_box, chat_mode, controls.system_box, *controls.settings]
    chat_outputs = [message, chatbot, history, chat_status]
    answering = [
        send.click(respond, chat_inputs, chat_outputs),
        message.submit(respond, chat_inputs, chat_outputs),
    ]

    def stop_chat(request: gr.Request):  # the answer so far stays, as the last reply
        state.stop_turn(request, "chat")

    stop.click(stop_chat, None, None)
    # cleared again one round trip later: an answer's update already on its way may land after the first
    reset.click(reset_chat, None, [chatbot, history, chat_status], cancels=answering).then(
        lambda: ([], [], "history cleared"), None, [chatbot, history, chat_status]
    )
    return chat_mode


def side_by_side_page(
    state: AppState, controls: Controls, start_modes: list[str], start_mode: str, other_mode: str
) -> tuple[gr.Dropdown, gr.Dropdown]:
    """The Side by side page: one prompt answered by two inference modes in turn; returns its two mode
    pickers."""
    cache, gen0, cfg = state.cache, state.gen0, state.cfg
    with gr.Row(equal_height=True):
        prompt_box = gr.Textbox(label="prompt", lines=2, scale=5, elem_id="sbs-input")
        compare = gr.Button("Answer with both", variant="primary", scale=1, elem_id="sbs-send")
        sbs_stop = gr.Button("Stop", variant="stop", scale=0, elem_id="sbs-stop")
    with gr.Row():
        with gr.Column():
            mode_a = gr.Dropdown(
                start_modes, value=other_mode, label="left: inference mode", elem_id="sbs-mode-a"
            )
            answer_a = gr.Textbox(label="left answer", lines=10, interactive=False, elem_id="sbs-a")
            stats_a = gr.Markdown("", elem_id="sbs-a-stats")
        with gr.Column():
            mode_b = gr.Dropdown(
                start_modes, value=start_mode, label="right: inference mode", elem_id="sbs-mode-b"
            )
            answer_b = gr.Textbox(label="right answer", lines=10, interactive=False, elem_id="sbs-b")
            stats_b = gr.Markdown("", elem_id="sbs-b-stats")
    sbs_status = gr.Markdown("", elem_id="sbs-status")

    def side_by_side(
        text,
        choice,
        left,
        right,
        system,
        sampling,
        temperature,
        top_k,
        top_p,
        max_new,
        repetition,
        request: gr.Request,
    ):
        out = {answer_a: "", answer_b: "", stats_a: "", stats_b: "", sbs_status: ""}
        if not (text or "").strip():
            yield out | {sbs_status: "type a prompt first"}
            return
        turn = state.new_turn(request, "side")
        gen = generation_settings(gen0, sampling, temperature, top_k, top_p, max_new, repetition)
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": text.strip()}
        ]
        with cache.lock:
            for mode, answer, stats in ((left, answer_a, stats_a), (right, answer_b, stats_b)):
                if turn.stop.is_set():
                    out |= {stats: f"{mode}: not run (stopped)"}
                    yield out
                    continue
                try:
                    run_dir = state.run_path(choice)
                    if line := state.loading_line(run_dir, mode):
                        yield out | {stats: line}
                    loaded = cache.get(run_dir, mode)
                    max_len = context_length(loaded.model)
                    ids, _ = conversation_ids(
                        messages, loaded.tokenizer, loaded.cfg.dataset, gen.max_new_tokens, max_len
                    )
                    if ids.shape[1] + gen.max_new_tokens > max_len:
                        out |= {stats: f"{mode}: {too_long_line(ids.shape[1], gen.max_new_tokens, max_len)}"}
                        yield out
                        continue
                    set_seed(cfg.train.seed)  # both sides sample from the same random state
                    with closing(stream_reply(loaded, ids, gen, turn.stop)) as stream:
                        for partial, numbers in stream:
                            out |= {answer: partial, stats: f"{mode}: {progress_line(numbers)}"}
                            yield out
                    out |= {stats: f"{mode}: {stats_line(numbers)}"}
                    yield out
                except Exception as e:  # the page shows it; the app keeps serving
                    out |= {stats: f"{mode}: {state.error_line(e)}"}
                    yield out

    sbs_inputs = [prompt_box, controls.run_box, mode_a, mode_b, controls.system_box, *controls.settings]
    sbs_outputs = [answer_a, answer_b, stats_a, stats_b, sbs_status]
    compare.click(side_by_side, sbs_inputs, sbs_outputs)
    prompt_box.submit(side_by_side, sbs_inputs, sbs_outputs)

    def stop_sides(request: gr.Request):
        state.stop_turn(request, "side")

    sbs_stop.click(stop_sides, None, None)
    return mode_a, mode_b


def runs_page(state: AppState):
    """The Runs page: the runs under output_dir and one run's details. Returns (refresh, its outputs): what a
    page load calls to read the folders again."""
    output_dir = state.output_dir
    gr.Markdown(f"Runs under `{output_dir}`, newest first; times in UTC.")
    runs_df = gr.Dataframe(
        [],
        headers=web_pages.RUN_COLUMNS,
        interactive=False,
        wrap=True,
        column_widths=["38%", "10%", "11%", "7%", "9%", "5%", "8%", "6%", "6%"],
        elem_id="runs-table",
    )
    with gr.Row():
        open_box = gr.Dropdown([], value=None, label="open a run", scale=3, elem_id="run-open")
        refresh = gr.Button("↻ refresh", scale=0, elem_id="runs-refresh")
    loss_plot = gr.Plot(label="loss curve", elem_id="run-loss")
    evaluation = gr.Markdown("", elem_id="run-evaluation")
    with gr.Row():
        metrics_box = gr.Code(label="metrics.json", language="json", elem_id="run-metrics")
        config_box = gr.Code(label="config (.hydra/config.yaml)", language="yaml", elem_id="run-config")

    def refresh_table():
        rows = web_pages.runs_table(output_dir)
        return (
            [[r[c] for c in web_pages.RUN_COLUMNS] for r in rows],
            gr.update(choices=[r["run"] for r in rows]),
        )

    def open_run(name):
        if not name:
            return None, "", "", ""
        run_dir = (output_dir / name).resolve()
        if not run_dir.is_relative_to(output_dir) or not run_dir.is_dir():
            return (
                None,
                f"**`{name}` is not a run under `{output_dir}` (any more?);** ↻ refresh the list.",
                "",
                "",
            )
        details = web_pages.run_details(run_dir)
        figure = web_pages.loss_figure(details["history"], name)
        evaluation_text = details["evaluation"]
        if figure is None:
            evaluation_text = (
                "No loss history (no checkpoint's trainer_state.json, no TensorBoard "
                "events) in this run.\n\n" + evaluation_text
            )
        return figure, evaluation_text, json.dumps(details["metrics"], indent=2), details["config"]

    refresh.click(refresh_table, None, [runs_df, open_box])
    open_box.change(open_run, open_box, [loss_plot, evaluation, metrics_box, config_box])
    return refresh_table, [runs_df, open_box]


def sweeps_page(state: AppState):
    """The Sweeps page: the decision card (when the sweep has one), then the sweep's summary.md and plots.
    Returns (refresh, open, the picker, open's outputs) for the page load."""
    output_dir = state.output_dir
    with gr.Row():
        sweep_box = gr.Dropdown([], value=None, label="sweep", scale=3, elem_id="sweep-select")
        sweep_refresh = gr.Button("↻ refresh", scale=0, elem_id="sweeps-refresh")
    # the decision card on top when the sweep has one (decision.md + decision.png), then summary.md
    with gr.Row():
        sweep_card = gr.Markdown("", elem_id="sweep-card")
        sweep_card_plot = gr.Image(
            None, label="decision", visible=False, interactive=False, elem_id="sweep-card-plot"
        )
    sweep_md = gr.Markdown("", elem_id="sweep-summary")
    # "contain": each plot whole, axes and legend included (the default crops them to the tile)
    sweep_plots = gr.Gallery(
        label="plots", columns=2, height="auto", object_fit="contain", elem_id="sweep-plots"
    )

    def sweep_list(current=None):
        names = [p.relative_to(output_dir).as_posix() for p in web_pages.sweep_dirs(output_dir)]
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None))

    def open_sweep(name):
        no_card = ("", gr.update(value=None, visible=False))
        if not name:
            return (
                *no_card,
                f"No sweep report under `{output_dir}` yet: `python -m qlora_lab -m "
                f"+experiment=lora_vs_qlora` writes one.",
                [],
            )
        folder = (output_dir / name).resolve()
        if not folder.is_relative_to(output_dir):
            return *no_card, f"**`{name}` is not a sweep under `{output_dir}`.**", []
        try:
            page = web_pages.sweep_page(folder)
            from PIL import Image

            plots = [(Image.open(p).convert("RGB"), p.name) for p in page["plots"]]
            card_plot = Image.open(page["card_plot"]).convert("RGB") if page["card_plot"] else None
        except OSError as e:  # moved or deleted since the list was read: this sweep only
            return (
                *no_card,
                f"**The sweep `{name}` cannot be read** ({e.strerror or e}): it was moved "
                f"or deleted; ↻ refresh the list.",
                [],
            )
        return (
            page["card"] or "",
            gr.update(value=card_plot, visible=card_plot is not None),
            page["summary"],
            plots,
        )

    sweep_outputs = [sweep_card, sweep_card_plot, sweep_md, sweep_plots]
    sweep_box.input(open_sweep, sweep_box, sweep_outputs)
    sweep_refresh.click(sweep_list, sweep_box, sweep_box).then(open_sweep, sweep_box, sweep_outputs)
    return sweep_list, open_sweep, sweep_box, sweep_outputs


def build_app(cfg: Config, source: Path | None) -> gr.Blocks:
    """The four pages under one header, sharing one AppState."""
    state = AppState(cfg, source)
    set_seed(cfg.train.seed)
    start_choice = state.run_name(state.source) if state.source is not None else NO_RUN
    start_modes = state.modes_for(start_choice)
    start_mode = cfg.inference.mode.value
    start_mode = start_mode if start_mode in start_modes else start_modes[0]
    other_mode = InferenceMode.base.value if start_mode != InferenceMode.base.value else start_modes[0]

    with gr.Blocks(title="QLoRA Lab") as app:
        controls, refresh_runs = header(state, start_choice)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat_mode = chat_page(state, controls, start_modes, start_mode)
            with gr.Tab("Side by side", id="side"):
                mode_a, mode_b = side_by_side_page(state, controls, start_modes, start_mode, other_mode)
            with gr.Tab("Runs", id="runs"):
                refresh_table, runs_outputs = runs_page(state)
            with gr.Tab("Sweeps", id="sweeps"):
                sweep_list, open_sweep, sweep_box, sweep_outputs = sweeps_page(state)

        def new_run(choice):
            modes = state.modes_for(choice)
            pick = lambda want: want if want in modes else modes[0]  # noqa: E731
            return (
                gr.update(choices=modes, value=pick(start_mode)),
                gr.update(choices=modes, value=pick("base")),
                gr.update(choices=modes, value=pick(start_mode)),
            )

        controls.run_box.change(new_run, controls.run_box, [chat_mode, mode_a, mode_b])
        refresh_runs.click(lambda: gr.update(choices=state.run_choices()), None, controls.run_box)

        def on_load():
            """Every page load reads the folders again: a run or sweep written since shows up."""
            table, opened = refresh_table()
            return gr.update(choices=state.run_choices()), table, opened, sweep_list()

        app.load(on_load, None, [controls.run_box, *runs_outputs, sweep_box]).then(
            open_sweep, sweep_box, sweep_outputs
        )
    return app


# ---------------------------------------------------------------- the stage


def check_port(host: str, port: int) -> None:
    """Fail with one sentence, before Gradio starts, when the address cannot be served."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(
            f"web.host={host} web.port={port} cannot be served ({e.strerror}); pick a free port with "
            f"web.port=N, or a local address for web.host."
        ) from None


def run(cfg: Config, run: Run) -> None:
    host, port = cfg.web.host, int(cfg.web.port)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests to itself
    check_port(host, port)
    if not is_loopback(host):  # validate() has made sure of a login
        log.warning(
            "web.host=%s: the app listens on that interface; anyone who reaches port %d gets its login page "
            "(web.auth)",
            host,
            port,
        )
    source = run.source if cfg.run_dir else None
    app = build_app(cfg, source)
    app.queue(default_concurrency_limit=1)
    auth = tuple(cfg.web.auth.split(":", 1)) if cfg.web.auth else None
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
        ssr_mode=False,
        inbrowser=False,
        auth=auth,
        app_kwargs={"middleware": [Middleware(Guard, names=served_names(host))]},
    )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"web app: http://{shown}:{port}  (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: a normal end of this stage
        print("web app stopped", flush=True)
    finally:
        app.close()
    run.log({"web/served_s": time.perf_counter() - run.started})
