"""Load and save safetensors VLMs (and causal LMs) without ever unpickling anything.

    model, processor = ue.load_vlm("path/to/llava", dtype="bfloat16", device="cuda")

A checkpoint folder holds config.json and model.safetensors, or a sharded model.safetensors.index.json.
Every key layout transformers' from_pretrained accepts is accepted, because the names are mapped by transformers'
own conversion mapping for the class (transformers.conversion_mapping): LLaVA's old layout (language_model.model.*,
as llava-hf ships it) and current one (model.language_model.*), Qwen2-VL / Qwen2.5-VL's Hub layout (model.layers.*,
visual.*) and current one; a user's key_mapping is applied first, as from_pretrained applies it.

Supported architectures (SUPPORTED_VLMS; any other VLM is refused with this list): LLaVA (model_type "llava"),
Qwen2-VL ("qwen2_vl") and Qwen2.5-VL ("qwen2_5_vl"), plus text-only causal LMs known to transformers.

The weights are read by transformers' own `from_pretrained` (the model is built on the meta device and filled
from the memory-mapped safetensors in the dtype asked for: no fp32 copy with random weights), after our checks
have read only the files' headers: safetensors only (never a pickle), every shard present, no missing,
unexpected or mis-shaped tensor. After loading, every weight is scanned for NaN/inf (check_finite=False skips).
"""
import json
import os
import re
from typing import Dict, NamedTuple, Tuple

import torch
from safetensors import SafetensorError, safe_open

from unlearn_engine.api.chat_template import attach_chat_template, find_chat_template
from unlearn_engine.atomic import atomic_dir
from unlearn_engine.checks import fail, require

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

class CheckpointError(ValueError):
    """The checkpoint folder or one of its files is not what a safetensors VLM checkpoint must be."""


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


# model_type -> the transformers class: the VLM families whose module layout (decoder, visual tokens, image
# inputs) the rest of the package knows
SUPPORTED_VLMS = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def _unsupported(config, why: str) -> CheckpointError:
    return CheckpointError(f"unsupported architecture: model_type={config.model_type!r} {why}; supported: "
                           f"{', '.join(f'{k} ({v})' for k, v in SUPPORTED_VLMS.items())} and text-only causal LMs")


def _model_class(config):
    import transformers

    if config.model_type in SUPPORTED_VLMS:
        return getattr(transformers, SUPPORTED_VLMS[config.model_type])
    if type(config) in transformers.AutoModelForImageTextToText._model_mapping or \
            getattr(config, "vision_config", None) is not None:
        raise _unsupported(config, "is a vision-language model this package does not support")
    try:
        return transformers.AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise _unsupported(config, "is neither a supported VLM nor a causal LM known to this transformers "
                           "version") from None


def _shard_files(path) -> Dict[str, list]:
    """Map each safetensors file of the checkpoint to the tensor names the index says it holds (None: all)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {err}") from None
        files: Dict[str, list] = {}
        for name, shard in weight_map.items():
            files.setdefault(shard, []).append(name)
        for shard in files:
            if not os.path.exists(os.path.join(path, shard)):
                raise CheckpointError(f"missing shard {shard} listed in {INDEX_FILE}")
        return files
    if os.path.exists(os.path.join(path, SINGLE_FILE)):
        return {SINGLE_FILE: None}
    pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(f"{path} holds only pickle checkpoints ({', '.join(pickles)}); unlearn_engine loads "
                              "safetensors only, because unpickling can run arbitrary code. Convert them with a "
                              "tool you trust (e.g. transformers' save_pretrained(safe_serialization=True)).")
    raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _read_shapes(path, files) -> Dict[str, tuple]:
    """{tensor name: shape} from the safetensors headers (no tensor data is read)."""
    shapes = {}
    for shard, listed in files.items():
        full = os.path.join(path, shard)
        try:
            with safe_open(full, framework="pt", device="cpu") as f:
                names = list(f.keys())
                if listed is not None and set(listed) - set(names):
                    missing = sorted(set(listed) - set(names))[:5]
                    raise CheckpointError(f"{shard} lacks tensors the index assigns to it: {missing}")
                for name in names:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except SafetensorError as err:
            raise CheckpointError(f"{shard} is not a readable safetensors file (truncated or corrupt?): "
                                  f"{err}") from None
    return shapes


def _checkpoint_names(skeleton, names, key_mapping=None) -> Dict[str, Tuple[str, bool]]:
    """{checkpoint tensor name: (the model's name for it, whether a converter reshapes it)}, renamed the way
    from_pretrained renames them: transformers' own conversion mapping for the class (both LLaVA layouts, the Qwen-VL
    Hub layout, ...), the user's key_mapping first, and the base-model prefix added or dropped as needed."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(skeleton, key_mapping=key_mapping)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected, prefix = skeleton.state_dict(), skeleton.base_model_prefix
    mapped = {}
    for name in names:
        new, pattern = rename_source_key(name, renamings, converters, prefix, expected)
        if new not in expected and name in expected:  # as from_pretrained: a name already right stays
            new, pattern = rename_source_key(name, [], [], prefix, expected)
        mapped[name] = (new, pattern is not None)
    return mapped


def check_checkpoint_dir(path: str) -> Dict[str, list]:
    """The cheap checks of a checkpoint folder (a folder, config.json, safetensors files or index, no pickle);
    returns _shard_files(path)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json")
    return _shard_files(path)


def _config(path):
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"unsupported or invalid config.json in {path}: {err}") from None


def context_length(path: str) -> int | None:
    """How many positions the checkpoint's language model takes (its config's max_position_embeddings), read from
    config.json alone; None when the config does not say."""
    config = _config(path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)
    return int(positions) if positions else None


def empty_model(path: str) -> torch.nn.Module:
    """The checkpoint's model built on the meta device (no memory, no weights): for checks of module layout."""
    check_checkpoint_dir(path)
    config = _config(path)
    with torch.device("meta"):
        return _model_class(config)(config)


def _check_finite(model: torch.nn.Module) -> None:
    """CheckpointError naming the first parameter or buffer holding NaN or inf."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        # fast path: fp32 sums (no bool copy); a non-finite sum is confirmed element-wise, since huge finite
        # values could overflow it
        flat = tensor.detach().reshape(-1)
        if all(bool(torch.isfinite(flat[i:i + (1 << 22)].sum(dtype=torch.float32)))  # 4M elements at a time:
               for i in range(0, flat.numel(), 1 << 22)):                          # small fp32 temporaries
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(f"tensor {name} holds {bad} non-finite value(s) (NaN or inf): the checkpoint is "
                                  "broken (pass check_finite=False / --skip-finite-check to load it anyway)")


def load_vlm(path: str, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "cpu", *,
             load_processor: bool = True, check_finite: bool = True,
             key_mapping: Dict[str, str] | None = None) -> Tuple[torch.nn.Module, object]:
    """(model, processor or tokenizer or None) from a safetensors checkpoint folder; model in eval mode.
    The processor is the checkpoint's AutoProcessor when it ships one (its .tokenizer and .image_processor),
    else its tokenizer. check_finite: refuse weights holding NaN/inf (CheckpointError naming the tensor).
    key_mapping: {regex: replacement} for checkpoint names, applied before transformers' own mapping (as
    from_pretrained's key_mapping)."""
    import transformers

    dtype = _dtype(dtype)
    files = check_checkpoint_dir(path)
    config = _config(path)
    cls = _model_class(config)
    with torch.device("meta"):  # the module layout only: no memory
        skeleton = cls(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    shapes = _read_shapes(path, files)
    mapped = _checkpoint_names(skeleton, shapes, key_mapping)
    ignored = [re.compile(p) for p in getattr(skeleton, "_keys_to_ignore_on_load_unexpected", None) or ()]
    del skeleton
    unexpected = sorted(k for k, (new, _) in mapped.items()
                        if new not in expected and not any(p.search(k) for p in ignored))
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in the checkpoint: {unexpected[:10]}"
                              + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
    present = {new for new, _ in mapped.values()}
    tied = {k for k in expected if k.endswith("lm_head.weight")} if _ties_embeddings(config) else set()
    missing = sorted(set(expected) - present - tied)
    if missing:
        raise CheckpointError(f"missing tensor(s) in the checkpoint: {missing[:10]}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    for name, (new, converted) in mapped.items():
        if not converted and shapes[name] != expected[new]:  # a converter's inputs have their own shapes
            raise CheckpointError(f"tensor {name} has shape {shapes[name]} in the checkpoint but the model "
                                  f"expects {expected[new]}" + (f" (as {new})" if new != name else ""))
    device = torch.device(device)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # our checks above already said what was wrong
    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # stderr stays for one-line errors
    try:
        model = cls.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True, local_files_only=True,
                                    device_map={"": device} if device.type != "cpu" else None,
                                    key_mapping=key_mapping)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"transformers could not load {path}: {' '.join(str(err).split())}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            transformers.utils.logging.enable_progress_bar()
    model = model.to(device).eval()
    if check_finite:
        _check_finite(model)
    return model, (_load_processor(path) if load_processor else None)


class PromptableVLM(NamedTuple):
    model: torch.nn.Module
    processor: object
    tokenizer: object
    image_processor: object


def load_promptable(path: str, dtype="bfloat16", device="cpu", *, check_finite: bool = True,
                    what: str = "--model") -> PromptableVLM:
    """load_vlm for a model that will be prompted: refuses a checkpoint without tokenizer files (ValueError
    naming `what`) before any weight is read, and splits the processor into its tokenizer and image processor (None
    when it has none)."""
    processor = check_promptable(path, what)  # seconds; the weights can take minutes
    model, _ = load_vlm(path, dtype=dtype, device=device, check_finite=check_finite, load_processor=False)
    return PromptableVLM(model, processor, getattr(processor, "tokenizer", processor),
                         getattr(processor, "image_processor", None))


def check_promptable(path: str, what: str = "--model"):
    """The checkpoint folder's cheap checks and its processor (or tokenizer), without reading a weight: ValueError
    naming `what` when it has no tokenizer files, since its prompts could not be encoded."""
    check_checkpoint_dir(path)
    processor = _load_processor(path)
    if processor is None:
        raise ValueError(f"{what} {path} has no tokenizer files: prompts cannot be encoded")
    return processor


def default_device() -> str:
    """The commands' --device default: cuda when a CUDA GPU is here, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device) -> None:
    """--device names a torch device this machine has (cpu, cuda[:N] or mps)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        fail(f"--device {device!r} is not a torch device ({str(err).splitlines()[0]})")
    if dev.type == "cuda":
        require(torch.cuda.is_available(), f"--device {device}: no CUDA GPU is available here (use --device cpu)")
        require(dev.index is None or dev.index < torch.cuda.device_count(),
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        require(torch.backends.mps.is_available(), f"--device {device}: MPS is not available here")
    else:
        require(dev.type == "cpu", f"--device {device}: only cpu and cuda devices are supported")


def check_model(model: str, dtype: str, device) -> None:
    """--model, --dtype and --device, checked before any weight is read."""
    require(dtype in DTYPES, f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_device(device)
    check_promptable(model, "--model")  # its tokenizer too: a 7B's weights take minutes to load


def _ties_embeddings(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))


class SplitProcessor:
    """A checkpoint's tokenizer and image processor, loaded apart when its AutoProcessor cannot be built here
    (Qwen2-VL's also builds a video processor, which needs torchvision); save_pretrained writes both. Its chat
    template is its tokenizer's (load_vlm puts the checkpoint's there, wherever it was found)."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    @property
    def chat_template(self):
        return getattr(self.tokenizer, "chat_template", None)

    def save_pretrained(self, path: str) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def _load_processor(path):
    """The checkpoint's processor (or SplitProcessor, or tokenizer, or None), its tokenizer carrying the chat
    template transformers would find for it (chat_template.find_chat_template), even where the processor that
    would hold it cannot be built here."""
    processor = _build_processor(path)
    if processor is not None:
        try:
            attach_chat_template(processor, find_chat_template(path, processor))
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    return processor


def _build_processor(path):
    import transformers

    for auto in (transformers.AutoProcessor, transformers.AutoTokenizer):
        try:
            return auto.from_pretrained(path, local_files_only=True)
        except ImportError:  # a sub-processor needs a package not installed here (torchvision): load the two we use
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError, KeyError, TypeError):
                return None
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # "falling back to the PIL backend" is what we want
            try:
                return SplitProcessor(tokenizer, transformers.AutoImageProcessor.from_pretrained(
                    path, local_files_only=True))
            except (OSError, ValueError, KeyError, TypeError, ImportError):
                return tokenizer
            finally:
                transformers.logging.set_verbosity(verbosity)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def save_vlm(model: torch.nn.Module, path: str, *, processor=None, max_shard_bytes: int | None = None) -> None:
    """Write what transformers' save_pretrained writes (config.json, generation_config.json, safetensors in the
    checkpoint's original key layout, sharded with an index when max_shard_bytes is given, tied weights once), so
    plain from_pretrained reloads it; atomically: into a temporary folder beside `path`, then renamed over it."""
    import transformers

    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" is noise for a one-line CLI
    try:
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp, safe_serialization=True,
                                  max_shard_size=max_shard_bytes if max_shard_bytes is not None else "1000GB")
            if processor is not None:
                processor.save_pretrained(tmp)
    finally:
        if bar:
            transformers.utils.logging.enable_progress_bar()
