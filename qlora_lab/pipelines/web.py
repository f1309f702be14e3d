"""Web app: `python -m qlora_lab pipeline=web [run_dir=RUN] [web.host=...] [web.port=...]`

Four pages in one Gradio app, served on web.host:web.port (this machine only by default) until Ctrl-C:
  Chat          streamed replies from a run in any inference mode, the history rendered as in training and chat
  Side by side  one prompt, two inference modes (base vs fine-tuned by default), with time to first token and tokens/s
  Runs          the runs under paths.output_dir; one run's config, metrics.json, evaluation table and loss curve
  Sweeps        a sweep's summary.md tables and plots

Gradio rather than Streamlit: a Gradio event handler that is a Python generator streams each yield to the page
(Streamlit reruns the whole script on every interaction), and Gradio apps start inside this process, on the
config this job already composed, with no second command line. Only one model is held at a time (ModelSlot).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from queue import Queue

import torch
from omegaconf import OmegaConf
from transformers import set_seed
from transformers.generation.streamers import BaseStreamer

from .. import web_pages
from ..config import Config, ConfigError, DatasetConfig, GenerationConfig, InferenceMode
from ..data import encode, render_prompt
from ..inference import hf_generation_config, load_for_inference
from ..rundir import Run, inherit_from_run

log = logging.getLogger(__name__)
NO_RUN = "(no run: the base model)"


# ---------------------------------------------------------------- prompt

def conversation_ids(messages: list[dict], tokenizer, d: DatasetConfig, max_new_tokens: int, max_len: int):
    """(input ids, the messages they hold): rendered by data.render_prompt, as pipeline=chat and training render,
    with the oldest exchanges dropped until the prompt and the answer fit the context, as chat does. The one place
    the app renders a prompt."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    history = messages[len(system):]
    while True:
        ids = encode(render_prompt(system + history, tokenizer, d), tokenizer, return_tensors="pt")["input_ids"]
        if ids.shape[1] + max_new_tokens <= max_len or len(history) <= 1:
            return ids, system + history
        history = history[2:]


# ---------------------------------------------------------------- one model at a time

@dataclass
class Loaded:
    key: tuple[str, str]  # (run folder or "", inference mode)
    model: object
    tokenizer: object
    cfg: Config  # the run's config: its model, quantization and dataset template
    load_s: float


class ModelSlot:
    """Holds at most one model: asking for another run or mode unloads the current one first. `lock` is held by
    whoever generates, so that a load never pulls the model from under a running generation."""

    def __init__(self, cfg: Config, source: Path | None):
        self.cfg, self.source = cfg, source  # the job's config and run (run_dir=), if any
        self.loaded: Loaded | None = None
        self.lock = threading.Lock()

    def run_config(self, run_dir: Path | None) -> Config:
        """The config a run was trained with (model, quantization, lora, dataset, train), on this job's settings."""
        if run_dir is None or run_dir == self.source:
            return self.cfg
        return inherit_from_run(self.cfg, run_dir, [])[0]

    def get(self, run_dir: Path | None, mode: str) -> Loaded:
        key = (str(run_dir or ""), InferenceMode(mode).value)
        if self.loaded is not None and self.loaded.key == key:
            return self.loaded
        self.unload()
        if run_dir is None and key[1] != InferenceMode.base.value:
            raise ConfigError(f"inference mode {key[1]} needs a run; pick a run, or the base mode.")
        cfg = self.run_config(run_dir)
        t0 = time.perf_counter()
        model, tokenizer = load_for_inference(cfg, run_dir or Path("."), key[1])
        self.loaded = Loaded(key, model, tokenizer, cfg, time.perf_counter() - t0)
        return self.loaded

    def unload(self) -> None:
        if self.loaded is not None:
            self.loaded = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# ---------------------------------------------------------------- streaming

class _TokenStreamer(BaseStreamer):
    """Hands the answer so far to the reading thread after every new token, and times the first one.
    (TextIteratorStreamer holds text back until a space, which Chinese text or a random test model may never write.)"""

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


def stream_reply(loaded: Loaded, ids, gen: GenerationConfig) -> Iterator[tuple[str, dict]]:
    """Yields (the answer so far, stats) while generate() runs in a thread; stats: new_tokens, ttft_s, seconds,
    tokens_per_s (new tokens ÷ the answer's wall time). An error inside generate() is raised here."""
    model, tokenizer = loaded.model, loaded.tokenizer
    config = hf_generation_config(gen, tokenizer)
    streamer = _TokenStreamer(tokenizer)
    device = next(model.parameters()).device
    failure: list[BaseException] = []

    def work():
        try:
            with torch.no_grad():
                model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                               generation_config=config, streamer=streamer)
        except BaseException as e:  # noqa: B036 - handed to the page's thread, which shows it
            failure.append(e)
            streamer.end()  # unblock the reader

    t0 = time.perf_counter()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = ""  # no new token at all: an empty answer

    def stats() -> dict:
        seconds = time.perf_counter() - t0
        ttft = streamer.first_token_at - t0 if streamer.first_token_at else None
        return {"new_tokens": len(streamer.tokens), "ttft_s": ttft, "seconds": seconds,
                "tokens_per_s": len(streamer.tokens) / seconds if seconds > 0 else 0.0}

    for text in streamer:
        yield text, stats()
    thread.join()
    if failure:
        raise failure[0]
    yield text.strip(), stats()


def stats_line(stats: dict) -> str:
    ttft = f"{stats['ttft_s']:.2f} s" if stats["ttft_s"] is not None else "–"
    return (f"{stats['new_tokens']} tokens in {stats['seconds']:.2f} s: **{stats['tokens_per_s']:.1f} tokens/s**, "
            f"time to first token **{ttft}**")


def progress_line(stats: dict) -> str:
    return f"generating: {stats['new_tokens']} tokens so far"


def generation_settings(base: GenerationConfig, sampling: bool, temperature: float, top_k: int, top_p: float,
                        max_new_tokens: int, repetition_penalty: float) -> GenerationConfig:
    """The generation group with the page's values; the page's controls keep each in its valid range."""
    return replace(base, do_sample=bool(sampling), temperature=float(temperature), top_k=int(top_k),
                   top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                   repetition_penalty=float(repetition_penalty))


# ---------------------------------------------------------------- the app

def build_app(cfg: Config, source: Path | None):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports, no version check on the network
    import gradio as gr

    output_dir = Path(cfg.paths.output_dir)
    slot = ModelSlot(cfg, source)
    gen0 = GenerationConfig(**OmegaConf.to_container(cfg.generation)) if OmegaConf.is_config(cfg.generation) \
        else cfg.generation
    set_seed(cfg.train.seed)

    def run_name(path: Path) -> str:
        """A run's name in the page: its folder relative to output_dir (where the Runs page lists it)."""
        try:
            return path.resolve().relative_to(output_dir.resolve()).as_posix()
        except ValueError:
            return str(path)

    def run_choices() -> list[str]:
        names = [r["run"] for r in web_pages.runs_table(output_dir) if "train" in r["stages"].split(",")]
        if source is not None:
            names.insert(0, run_name(source))
        return [NO_RUN] + list(dict.fromkeys(names))

    def run_path(choice: str | None) -> Path | None:
        if not choice or choice == NO_RUN:
            return None
        path = Path(choice)
        return (path if path.is_absolute() else output_dir / path).resolve()  # one key per run in ModelSlot

    def modes_for(choice: str | None) -> list[str]:
        return web_pages.inference_modes(run_path(choice))

    def loading_line(choice, mode) -> str | None:
        """What the page says while a model loads; None when the one asked for is already loaded."""
        run_dir = run_path(choice)
        if slot.loaded is not None and slot.loaded.key == (str(run_dir or ""), mode):
            return None
        where = f" of {run_name(run_dir)}" if run_dir else f" ({slot.cfg.model.name_or_path})"
        return f"loading the {mode} model{where} (the previous model is unloaded first) ..."

    def loaded_line(loaded: Loaded) -> str:
        run_dir, mode = loaded.key
        return f"{mode} model{' of ' + run_name(Path(run_dir)) if run_dir else ''}, loaded in {loaded.load_s:.1f} s"

    def error_line(e: BaseException) -> str:
        log.exception("web app: generation failed")
        return f"**error:** {type(e).__name__}: {e}"

    start_choice = run_name(source) if source is not None else NO_RUN
    start_modes = modes_for(start_choice)
    start_mode = cfg.inference.mode.value
    start_mode = start_mode if start_mode in start_modes else start_modes[0]
    other_mode = InferenceMode.base.value if start_mode != InferenceMode.base.value else start_modes[0]

    with gr.Blocks(title="QLoRA Lab") as app:
        gr.Markdown("# QLoRA Lab")
        with gr.Row():
            run_box = gr.Dropdown(run_choices(), value=start_choice, label="run", scale=3, elem_id="run-select",
                                  allow_custom_value=True)
            refresh_runs = gr.Button("↻ runs", scale=0)
        with gr.Accordion("System prompt and generation settings", open=False):
            system_box = gr.Textbox(cfg.dataset.system_prompt or "", label="system prompt", lines=2,
                                    elem_id="system-prompt")
            with gr.Row():
                sampling = gr.Checkbox(gen0.do_sample, label="sampling (off: greedy)")
                temperature = gr.Slider(0.05, 2.0, value=max(gen0.temperature, 0.05), step=0.05, label="temperature")
                top_k = gr.Slider(0, 200, value=gen0.top_k, step=1, label="top-k (0: off)")
                top_p = gr.Slider(0.05, 1.0, value=gen0.top_p, step=0.05, label="top-p")
            with gr.Row():
                max_new = gr.Slider(1, 1024, value=gen0.max_new_tokens, step=1, label="max new tokens")
                repetition = gr.Slider(1.0, 2.0, value=max(gen0.repetition_penalty, 1.0), step=0.05,
                                       label="repetition penalty")
        settings = [sampling, temperature, top_k, top_p, max_new, repetition]

        with gr.Tabs():
            # ---------------------------------------------------------------- chat
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=True):
                    chat_mode = gr.Dropdown(start_modes, value=start_mode, label="inference mode", scale=1,
                                            elem_id="chat-mode")
                    chat_status = gr.Markdown("", elem_id="chat-status")
                chatbot = gr.Chatbot(label="conversation", elem_id="chat-history", height=360)
                with gr.Row():
                    message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=5,
                                         elem_id="chat-input")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                    reset = gr.Button("Reset", scale=1, elem_id="chat-reset")
                history = gr.State([])

                def respond(text, messages, choice, mode, system, *values):
                    text = (text or "").strip()
                    if not text:
                        yield "", messages, messages, gr.skip()
                        return
                    messages = messages + [{"role": "user", "content": text}]
                    shown = messages + [{"role": "assistant", "content": ""}]
                    yield "", shown, messages, "…"
                    with slot.lock:
                        try:
                            if line := loading_line(choice, mode):
                                yield gr.skip(), shown, messages, line
                            loaded = slot.get(run_path(choice), mode)
                            status = loaded_line(loaded)
                            gen = generation_settings(gen0, *values)
                            prompt = [{"role": "system", "content": system}] if system.strip() else []
                            max_len = getattr(loaded.model.config, "max_position_embeddings", None) or 2048
                            ids, kept = conversation_ids(prompt + messages, loaded.tokenizer,
                                                         loaded.cfg.dataset, gen.max_new_tokens, max_len)
                            messages = kept[len(prompt):]
                            for answer, stats in stream_reply(loaded, ids, gen):
                                # gr.skip(): the box keeps what the user types next while this answer streams
                                yield gr.skip(), messages + [{"role": "assistant", "content": answer}], messages, \
                                    f"{status} · {progress_line(stats)}"
                            messages = messages + [{"role": "assistant", "content": answer}]
                            yield gr.skip(), messages, messages, f"{status} · {stats_line(stats)}"
                        except Exception as e:  # the page shows it; the app keeps serving
                            yield text, messages[:-1], messages[:-1], error_line(e)  # the message back, to retry

                chat_inputs = [message, history, run_box, chat_mode, system_box, *settings]
                chat_outputs = [message, chatbot, history, chat_status]
                send.click(respond, chat_inputs, chat_outputs)
                message.submit(respond, chat_inputs, chat_outputs)
                reset.click(lambda: ([], [], "history cleared"), None, [chatbot, history, chat_status])

            # ---------------------------------------------------------------- side by side
            with gr.Tab("Side by side", id="side"):
                prompt_box = gr.Textbox(label="prompt", lines=2, elem_id="sbs-input")
                compare = gr.Button("Answer with both", variant="primary", elem_id="sbs-send")
                with gr.Row():
                    with gr.Column():
                        mode_a = gr.Dropdown(start_modes, value=other_mode, label="left: inference mode",
                                             elem_id="sbs-mode-a")
                        answer_a = gr.Textbox(label="left answer", lines=10, interactive=False, elem_id="sbs-a")
                        stats_a = gr.Markdown("", elem_id="sbs-a-stats")
                    with gr.Column():
                        mode_b = gr.Dropdown(start_modes, value=start_mode, label="right: inference mode",
                                             elem_id="sbs-mode-b")
                        answer_b = gr.Textbox(label="right answer", lines=10, interactive=False, elem_id="sbs-b")
                        stats_b = gr.Markdown("", elem_id="sbs-b-stats")
                sbs_status = gr.Markdown("", elem_id="sbs-status")

                def side_by_side(text, choice, left, right, system, *values):
                    out = {answer_a: "", answer_b: "", stats_a: "", stats_b: "", sbs_status: ""}
                    if not (text or "").strip():
                        yield out | {sbs_status: "type a prompt first"}
                        return
                    gen = generation_settings(gen0, *values)
                    messages = ([{"role": "system", "content": system}] if system.strip() else []) + \
                        [{"role": "user", "content": text.strip()}]
                    with slot.lock:
                        for mode, answer, stats in ((left, answer_a, stats_a), (right, answer_b, stats_b)):
                            try:
                                if line := loading_line(choice, mode):
                                    yield out | {stats: line}
                                loaded = slot.get(run_path(choice), mode)
                                max_len = getattr(loaded.model.config, "max_position_embeddings", None) or 2048
                                ids, _ = conversation_ids(messages, loaded.tokenizer, loaded.cfg.dataset,
                                                          gen.max_new_tokens, max_len)
                                set_seed(cfg.train.seed)  # both sides sample from the same random state
                                for partial, numbers in stream_reply(loaded, ids, gen):
                                    out |= {answer: partial, stats: f"{mode}: {progress_line(numbers)}"}
                                    yield out
                                out |= {stats: f"{mode}: {stats_line(numbers)}"}
                                yield out
                            except Exception as e:  # the page shows it; the app keeps serving
                                out |= {stats: f"{mode}: {error_line(e)}"}
                                yield out

                compare.click(side_by_side, [prompt_box, run_box, mode_a, mode_b, system_box, *settings],
                              [answer_a, answer_b, stats_a, stats_b, sbs_status])
                prompt_box.submit(side_by_side, [prompt_box, run_box, mode_a, mode_b, system_box, *settings],
                                  [answer_a, answer_b, stats_a, stats_b, sbs_status])

            # ---------------------------------------------------------------- runs
            with gr.Tab("Runs", id="runs"):
                gr.Markdown(f"Runs under `{output_dir.resolve()}`, newest first.")
                rows = web_pages.runs_table(output_dir)
                runs_df = gr.Dataframe([[r[c] for c in web_pages.RUN_COLUMNS] for r in rows],
                                       headers=web_pages.RUN_COLUMNS, interactive=False, wrap=True,
                                       column_widths=["22%", "12%", "14%", "8%", "12%", "8%", "10%", "7%", "7%"],
                                       elem_id="runs-table")
                with gr.Row():
                    open_box = gr.Dropdown([r["run"] for r in rows], value=None, label="open a run", scale=3,
                                           elem_id="run-open")
                    refresh = gr.Button("↻ refresh", scale=0, elem_id="runs-refresh")
                loss_plot = gr.Plot(label="loss curve", elem_id="run-loss")
                evaluation = gr.Markdown("", elem_id="run-evaluation")
                with gr.Row():
                    metrics_box = gr.Code(label="metrics.json", language="json", elem_id="run-metrics")
                    config_box = gr.Code(label="config (.hydra/config.yaml)", language="yaml", elem_id="run-config")

                def refresh_table():
                    rows = web_pages.runs_table(output_dir)
                    return ([[r[c] for c in web_pages.RUN_COLUMNS] for r in rows],
                            gr.update(choices=[r["run"] for r in rows]))

                def open_run(name):
                    if not name:
                        return None, "", "", ""
                    details = web_pages.run_details(output_dir / name)
                    figure = web_pages.loss_figure(details["history"], name)
                    evaluation_text = details["evaluation"]
                    if figure is None:
                        evaluation_text = "No loss history (no checkpoint's trainer_state.json, no TensorBoard " \
                                          "events) in this run.\n\n" + evaluation_text
                    return figure, evaluation_text, json.dumps(details["metrics"], indent=2), details["config"]

                refresh.click(refresh_table, None, [runs_df, open_box])
                open_box.change(open_run, open_box, [loss_plot, evaluation, metrics_box, config_box])

            # ---------------------------------------------------------------- sweeps
            with gr.Tab("Sweeps", id="sweeps"):
                sweeps = [str(p.relative_to(output_dir)) for p in web_pages.sweep_dirs(output_dir)]
                sweep_box = gr.Dropdown(sweeps, value=sweeps[0] if sweeps else None, label="sweep",
                                        elem_id="sweep-select")
                sweep_md = gr.Markdown("" if sweeps else f"No sweep report under `{output_dir}` yet: "
                                       f"`python -m qlora_lab -m +experiment=lora_vs_qlora` writes one.",
                                       elem_id="sweep-summary")
                sweep_plots = gr.Gallery(label="plots", columns=2, height="auto", elem_id="sweep-plots")

                def open_sweep(name):
                    if not name:
                        return gr.skip(), []
                    text, pngs = web_pages.sweep_page(output_dir / name)
                    from PIL import Image

                    return text, [(Image.open(p).convert("RGB"), p.name) for p in pngs]

                sweep_box.change(open_sweep, sweep_box, [sweep_md, sweep_plots])
                app.load(open_sweep, sweep_box, [sweep_md, sweep_plots])

        def new_run(choice):
            modes = modes_for(choice)
            pick = lambda want: want if want in modes else modes[0]  # noqa: E731
            return (gr.update(choices=modes, value=pick(start_mode)), gr.update(choices=modes, value=pick("base")),
                    gr.update(choices=modes, value=pick(start_mode)))

        run_box.change(new_run, run_box, [chat_mode, mode_a, mode_b])
        refresh_runs.click(lambda: gr.update(choices=run_choices()), None, run_box)
    return app


# ---------------------------------------------------------------- the stage

def check_port(host: str, port: int) -> None:
    """Fail with one sentence, before Gradio starts, when the address cannot be served."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"web.host={host} web.port={port} cannot be served ({e.strerror}); pick a free port with "
                          f"web.port=N, or a local address for web.host.") from None


def run(cfg: Config, run: Run) -> None:
    host, port = cfg.web.host, int(cfg.web.port)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests to itself
    check_port(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("web.host=%s: the app listens on that interface, so anyone who can reach it on port %d can "
                    "use the models and read the runs (it has no login)", host, port)
    source = run.source if cfg.run_dir else None
    app = build_app(cfg, source)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True,
               show_error=True, ssr_mode=False, inbrowser=False)
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
