"""Chat: talk to a trained run. `python -m qlora_lab pipeline=chat run_dir=RUN [inference=merged]
[generation=sampling]`

A REPL with streamed replies, `/reset` and `/exit`. The history is a conversation in the canonical form of
data.py (a system turn from chat.system_prompt, else dataset.system_prompt, then user and assistant turns),
rendered by data.render_prompt exactly as training rendered its conversations. With piped stdin (no TTY) it
reads one message a line, echoes it, and ends cleanly at EOF.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from transformers import TextStreamer, set_seed

from ..config import Config, ConfigError
from ..inference import context_length, conversation_ids, hf_generation_config, load_for_inference
from ..rundir import Run

HELP = "/reset clears the history, /exit (or Ctrl-D) quits"


def user_lines() -> Iterator[str]:
    """Lines typed at a prompt, or piped lines (echoed so that a transcript reads like a conversation)."""
    if sys.stdin.isatty():
        while True:
            try:
                yield input("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return
    else:
        for number, raw in enumerate(sys.stdin.buffer, 1):
            try:
                line = raw.decode("utf-8").rstrip("\n")
            except UnicodeDecodeError:
                raise ConfigError(
                    f"stdin line {number} is not UTF-8 text; pipe UTF-8 text to pipeline=chat, "
                    f"one message a line."
                ) from None
            print(f"you> {line}", flush=True)
            yield line


def run(cfg: Config, run: Run) -> list[dict]:
    mode = cfg.inference.mode
    model, tokenizer = load_for_inference(cfg, run.source, mode)
    config = hf_generation_config(cfg.generation, tokenizer)
    max_len = context_length(model)
    device = next(model.parameters()).device
    system_prompt = cfg.chat.system_prompt or cfg.dataset.system_prompt
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history: list[dict] = []
    set_seed(cfg.train.seed)
    print(f"chat with {run.source} ({mode.value}); {HELP}", flush=True)

    turns = 0
    for line in user_lines():
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            print("(history cleared)", flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text}; {HELP}", flush=True)
            continue
        history.append({"role": "user", "content": text})
        # the oldest exchanges are forgotten until the conversation fits the context
        ids, kept = conversation_ids(system + history, tokenizer, cfg.dataset, config.max_new_tokens, max_len)
        history = kept[len(system) :]
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=torch.ones_like(ids).to(device),
                    generation_config=config,
                    streamer=streamer,
                )
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            print("\n(interrupted)", flush=True)
            history.pop()
            continue
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})
        turns += 1
    print("bye", flush=True)
    run.log({"chat/turns": turns})
    return system + history
