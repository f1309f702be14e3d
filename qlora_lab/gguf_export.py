"""A merged Llama-family model folder -> one GGUF file (weights, tokenizer, chat template) for llama.cpp /
Ollama.

The `gguf` package (llama.cpp's own Python library) does the file format (GGUFWriter), the tensor names
(gguf.get_tensor_name_map), the special tokens (gguf.SpecialVocab: merges, bos/eos/pad ids, chat template)
and the block quantization (gguf.quants: NumPy ports of ggml's
reference Q8_0/Q4_0 rows). What it does not ship is the conversion recipe, which lives in llama.cpp's
convert_hf_to_gguf.py (a script, not part of the package). The Llama part of that recipe is hand-written here:
the metadata keys, the Q/K row permutation, which tensors stay F32, the pre-tokenizer name, the token types
(which llama.cpp's tokenizer depends on), padding the vocabulary to the embedding's rows and the provenance
keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from .config import ConfigError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)  # SmolLM2, Llama-3 (no RoPE scaling), TinyLlama-shaped models
Q = gguf.GGMLQuantizationType
# gguf_type -> (file type recorded in the header, type of the 2-D weights, type of token_embd/output)
GGUF_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16, Q.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0, Q.Q8_0),
    # llama-quantize keeps the embedding/output matrices at higher precision (Q6_K) for its 4-bit types; the
    # gguf package cannot write Q6_K, so they stay Q8_0 here.
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_0, Q.Q8_0),
}
# The regex Llama-3's tokenizer splits text with before byte-level BPE (llama.cpp calls this pre-tokenizer
# `llama-bpe`). llama.cpp recognises pre-tokenizers by hashing the tokens of a test text; we recognise the few
# we support from the tokenizer's own description instead.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ---------------------------------------------------------------- what we can convert


def check_supported(config: dict) -> None:
    """One sentence naming what is unsupported, before any weight is read. `config` is the model's
    config.json."""
    archs = config.get("architectures") or [config.get("model_type", "?")]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"export.format=gguf does not support the architecture {archs[0]} of this run's model; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (SmolLM2, Llama-3 shapes). "
            f"Use export.format=int8_dynamic instead."
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        # llama.cpp stores Llama-3.1 scaling as a rope_freqs tensor, which transformers' GGUF reader ignores:
        # such a file could not be checked against the merged model here, so it is not written.
        raise ConfigError(
            f"export.format=gguf does not support RoPE scaling (rope_type={rope_type}) yet; "
            f"only models with the default RoPE can be exported and verified."
        )


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for how this byte-level BPE tokenizer splits text before merging."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise ConfigError(
        f"export.format=gguf does not recognise this tokenizer's pre-tokenizer ({kinds}); supported: "
        f"GPT-2 byte-level, SmolLM2 (digits split) and Llama-3 (its split regex)."
    )


def check_tokenizer(folder: Path) -> str:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"export.format=gguf needs a fast tokenizer (tokenizer.json) in {folder}; this model's "
            f"tokenizer has none."
        )
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError(
            f"export.format=gguf supports byte-level BPE tokenizers (SmolLM2, Llama-3); this model's "
            f"is {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}."
        )
    return pre_tokenizer_name(tokenizer_json)


# ---------------------------------------------------------------- tokenizer and provenance


def looks_special(text: str) -> bool:
    """Chat-control tokens written like <|im_start|> (or with fullwidth bars, as DeepSeek's): llama.cpp types
    these CONTROL even when the tokenizer does not flag them special, since it matches CONTROL tokens in the
    text only."""
    return (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<\uff5c") and text.endswith("\uff5c>")
    )


def token_list(tokenizer_json: dict, n_vocab: int, folder: Path) -> tuple[list[str], list[int]]:
    """The vocabulary by id with llama.cpp's token types: added tokens CONTROL when special (or
    special-looking), USER_DEFINED otherwise, all others NORMAL; ids the tokenizer does not use (embedding
    rows past it) UNUSED. llama.cpp splits a text at CONTROL and USER_DEFINED tokens before BPE: typed NORMAL,
    `<|im_start|>` would be tokenized as its 8 characters."""
    by_id = {i: text for text, i in tokenizer_json["model"]["vocab"].items()}
    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", [])}
    by_id |= {i: t["content"] for i, t in added.items()}
    if max(by_id) >= n_vocab:
        raise ConfigError(
            f"the tokenizer in {folder} has {max(by_id) + 1} tokens but the model only {n_vocab} "
            f"embedding rows; it cannot be exported."
        )
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL
                if added[i].get("special") or looks_special(by_id[i])
                else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def adds_bos(folder: Path, bos_id: int | None) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself (its post-processor), as llama.cpp must
    too."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tokenizer.encode("a", add_special_tokens=True).ids
    return bos_id is not None and bool(ids) and ids[0] == bos_id


def add_provenance(writer: gguf.GGUFWriter, provenance: dict) -> None:
    """general.* keys saying what the file is: a fine-tune (general.finetune, general.description) of a base
    model (general.base_model.0.*), under the base's license."""
    base = provenance.get("base_model") or {}
    if base.get("name"):
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base["name"])
        if base.get("organization"):
            writer.add_base_model_organization(0, base["organization"])
        if base.get("repo_url"):
            writer.add_base_model_repo_url(0, base["repo_url"])
    for key, add in (
        ("license", writer.add_license),
        ("finetune", writer.add_finetune),
        ("description", writer.add_description),
    ):
        if provenance.get(key):
            add(provenance[key])
    if provenance.get("tags"):
        writer.add_tags(provenance["tags"])


# ---------------------------------------------------------------- weights


def permute_for_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary embedding pairs neighbouring dimensions, transformers' pairs the two halves of each
    head: convert_hf_to_gguf reorders the rows of Q and K (per head: interleave the halves), and transformers'
    GGUF reader undoes it. Same formula as LlamaModel.permute there."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def read_weights(folder: Path):
    """(name, fp32 tensor) for every tensor of the safetensors shards in `folder`, one at a time."""
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).float()


def encode(name: str, weight: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, Q]:
    """The tensor's bytes in its GGUF type: 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them."""
    _, matrix_type, embed_type = GGUF_TYPES[gguf_type]
    data = weight.numpy()
    qtype = (
        Q.F32
        if data.ndim == 1
        else embed_type
        if name in ("token_embd.weight", "output.weight")
        else matrix_type
    )
    if qtype is Q.F32:
        return data.astype(np.float32), Q.F32
    if qtype is Q.F16:
        return data.astype(np.float16), Q.F16
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the block size (32): llama.cpp falls back to F16 too
        return data.astype(np.float16), Q.F16


# ---------------------------------------------------------------- the file


def write_gguf(folder: Path, out: Path, gguf_type: str, name: str, provenance: dict | None = None) -> dict:
    """Write `folder` (a merged Hugging Face Llama checkpoint with its tokenizer) to `out`. Returns a summary.
    `provenance`: the general.* keys to record (see add_provenance)."""
    config = json.loads((folder / "config.json").read_text())
    check_supported(config)
    pre = check_tokenizer(folder)
    file_type = GGUF_TYPES[gguf_type][0]
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    rope = config.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))

    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # ---- tokenizer: tokens typed and padded to the embedding's rows (as convert_hf_to_gguf does), merges,
    # special ids, whether to add BOS, the chat template
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokens, types = token_list(tokenizer_json, config["vocab_size"], folder)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_special_token["bos"] = adds_bos(folder, special.special_token_ids.get("bos"))
    special.add_to_gguf(writer, quiet=True)
    add_provenance(writer, provenance or {})

    # ---- tensors, renamed to llama.cpp's names
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    counts: dict[str, int] = {}
    for hf_name, weight in read_weights(folder):
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # tied: llama.cpp reuses token_embd
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(
                f"export.format=gguf cannot map the tensor {hf_name} of {folder} to a llama.cpp name."
            )
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = permute_for_llama_cpp(weight, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = permute_for_llama_cpp(weight, n_kv)
        data, qtype = encode(gguf_name, weight, gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "tensor_types": counts,
        "pre_tokenizer": pre,
        "tokens": len(tokens),
        "token_types": {gguf.TokenType(t).name: types.count(t) for t in sorted(set(types))},
    }
