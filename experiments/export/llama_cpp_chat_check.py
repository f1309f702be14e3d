"""Does llama.cpp chat with a GGUF export exactly as the merged model does? Checked the way users run it.

    PYTHONPATH=. .venv/bin/python experiments/export/llama_cpp_chat_check.py RUN [--gguf FILE] [--prompts 3]

RUN is a trained run with merged/ and a GGUF export (default RUN/export/model-f16.gguf, from
`python -m qlora_lab pipeline=export run_dir=RUN export.gguf_type=f16`). For the first --prompts conversations
of the run's eval split (up to their last assistant turn, with dataset.system_prompt as in training):
  - merged: RUN/merged in fp32 with transformers, the prompt rendered by qlora_lab (data.render_prompt),
  greedy;
  - llama.cpp: llama_cpp.Llama on the GGUF file, `create_chat_completion` with the messages, so that the chat
    template embedded in the file renders them and llama.cpp's own tokenizer reads the result, greedy
    (temperature 0);
and compares the answers token for token (the pieces of llama.cpp's generated tokens, from its logprobs,
against the merged model's generated tokens decoded one by one) and as text, plus whether llama.cpp tokenizes
the rendered prompt to the same ids (this is where mistyped special tokens show: `<|im_start|>` split into its
characters). Writes experiments/export/llama_cpp_chat.json and llama_cpp_chat.md (or --out). Needs
llama-cpp-python; without it, says so and writes nothing. Meant for runs rendered with the model's chat
template (dataset.template=chat): a run trained on the plain rendering is prompted differently from what the
file's template writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from qlora_lab.config import register
from qlora_lab.data import encode, end_of_turn_id, load_splits, render_prompt, with_system
from qlora_lab.exports import gguf
from qlora_lab.layout import RunLayout
from qlora_lab.models import load_tokenizer

OUT = Path(__file__).resolve().parent


def conversations(cfg, n: int) -> list[dict]:
    """The first n eval rows as chat requests: the messages before their last assistant turn."""
    out = []
    for row in load_splits(cfg).eval[:n]:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context = [
            {k: v for k, v in m.items() if k != "loss_weight"}
            for m in with_system(messages[:last], cfg.dataset.system_prompt)
        ]
        out.append({"messages": context, "tools": row.get("tools")})
    return out


def merged_answer(model, tokenizer, cfg, conversation: dict, max_new_tokens: int) -> tuple[str, list[int]]:
    """The prompt as qlora_lab renders it (the system prompt is already in the messages) and the greedy
    answer's ids."""
    prompt = render_prompt(conversation["messages"], tokenizer, cfg.dataset, conversation["tools"])
    ids = encode(prompt, tokenizer, return_tensors="pt")["input_ids"]
    stops = [t for t in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if t is not None]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    new = new[
        : next((i for i, t in enumerate(new) if t in stops), len(new))
    ]  # the answer, without its end token
    return prompt, new


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--kv-f32",
        action="store_true",
        help="keep llama.cpp's KV cache in fp32 (its default is fp16), e.g. to check an f32 file",
    )
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print(
            "skipped: llama_cpp (llama-cpp-python) is not importable here, so llama.cpp cannot be checked; "
            "install "
            "it (pip install llama-cpp-python builds llama.cpp from source) or put it on PYTHONPATH. Nothing "
            "written."
        )
        return 0

    register()
    layout = RunLayout(args.run)
    cfg = OmegaConf.load(layout.config)
    gguf_file = args.gguf or gguf.path(args.run, "f16")
    if not gguf_file.is_file():
        print(
            f"error: {gguf_file} does not exist; write it with `python -m qlora_lab pipeline=export "
            f"run_dir={args.run} export.gguf_type=f16` or pass --gguf.",
            file=sys.stderr,
        )
        return 2
    tokenizer = load_tokenizer(str(layout.merged), cfg.model.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(layout.merged, dtype=torch.float32).eval()
    # logits_all: the logprobs of the chat completion name each generated token
    kv = {"type_k": 0, "type_v": 0} if args.kv_f32 else {}  # 0: GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=2048, seed=0, logits_all=True, verbose=False, **kv)

    results = []
    for conversation in conversations(cfg, args.prompts):
        prompt, expected = merged_answer(model, tokenizer, cfg, conversation, args.max_new_tokens)
        prompt_ids = encode(prompt, tokenizer)["input_ids"]
        llama_prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        reply = llm.create_chat_completion(
            messages=conversation["messages"],
            tools=conversation["tools"],
            temperature=0.0,
            top_k=1,
            max_tokens=args.max_new_tokens,
            seed=0,
            logprobs=True,
            top_logprobs=1,
        )
        choice = reply["choices"][0]
        text = choice["message"]["content"] or ""
        pieces = [c["token"] for c in (choice.get("logprobs") or {}).get("content") or []]
        expected_pieces = [tokenizer.decode([t]) for t in expected]
        same = pieces == expected_pieces
        results.append(
            {
                "messages": conversation["messages"],
                "merged": tokenizer.decode(expected),
                "llama_cpp": text,
                "same_tokens": same,
                "same_text": text == tokenizer.decode(expected, skip_special_tokens=True),
                "first_difference": None
                if same
                else next(
                    (i for i, (a, b) in enumerate(zip(pieces, expected_pieces, strict=False)) if a != b),
                    min(len(pieces), len(expected_pieces)),
                ),
                "prompt_tokens_same": list(llama_prompt_ids) == prompt_ids,
                "merged_tokens": len(expected),
                "llama_cpp_tokens": len(pieces),
            }
        )
        print(f"{'same' if same else 'DIFFERENT'}: {text[:80]!r}", flush=True)

    same = sum(r["same_tokens"] for r in results)
    summary = {
        "run": str(args.run),
        "gguf": str(gguf_file),
        "llama_cpp_python": llama_cpp.__version__,
        "kv_cache": "f32" if args.kv_f32 else "f16 (llama.cpp's default)",
        "prompts": len(results),
        "same_tokens": same,
        "same_text": sum(r["same_text"] for r in results),
        "prompt_tokens_same": sum(r["prompt_tokens_same"] for r in results),
        "max_new_tokens": args.max_new_tokens,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llama_cpp_chat.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    lines = [
        f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) on {gguf_file.name}, KV cache "
        f"{summary['kv_cache']}, create_chat_completion "
        f"with the file's chat template, greedy, max {args.max_new_tokens} new tokens, against "
        f"{args.run.name}/merged (fp32, transformers, greedy): {same} of {len(results)} answers equal token "
        f"for token; the rendered prompt tokenized alike in {summary['prompt_tokens_same']} of "
        f"{len(results)}.",
        "",
        "| # | same tokens | same text | prompt tokens same | merged | llama.cpp |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results):
        cells = [r["merged"], r["llama_cpp"]]
        cells = [c.replace("|", "\\|").replace("\n", " ")[:120] for c in cells]
        lines.append(
            f"| {i} | {r['same_tokens']} | {r['same_text']} | {r['prompt_tokens_same']} | {cells[0]} | "
            f"{cells[1]} |"
        )
    (args.out / "llama_cpp_chat.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
