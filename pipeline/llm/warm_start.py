"""finetune.init_adapter, a warm start: what it may have seen and what it must fit, checked before any training.

Every fold of a fine-tune starts from the same adapter, so an adapter that trained on a row the experiment scores
would leak that row's label into its out-of-fold number. stage=fit therefore records, beside its adapter, a content
key of every row it trained on (`seen_rows.parquet`: the pair in either A/B order, and its prompt); a warm start
that saw a scored row (or, with folds grouped by prompt, a scored prompt) is refused with the count and first ids.
An adapter without that record (a fold adapter, a fit made before it existed) is refused when its recorded train
file is this one. The adapter must also fit the model: the same base model (when its folder says which) and width.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from pipeline import artifacts
from pipeline.data import pair_keys
from pipeline.errors import UserError
from pipeline.llm import modeling

log = logging.getLogger(__name__)
SEEN_FILE = "seen_rows.parquet"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def content_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """Per row: `pair`, one key for the pair in either A/B order, and `prompt`, a key of its prompt (all turns)."""
    forward, swapped = pair_keys(frame), pair_keys(frame, swap=True)
    pair = [_digest(min(a, b)) for a, b in zip(forward, swapped)]
    prompt = [_digest("\x1f".join(turns)) for turns in frame["prompt"]]
    return pd.DataFrame({"pair": pair, "prompt": prompt})


def record_seen(adapter_parent: Path, frames: list[pd.DataFrame]) -> None:
    """Write the content keys of every row a fit trained on into `adapter_parent` (beside its adapter/)."""
    artifacts.write_parquet(adapter_parent / SEEN_FILE, pd.concat([content_keys(f) for f in frames],
                                                                  ignore_index=True))


def seen_rows(adapter_dir: Path, train: pd.DataFrame, train_fingerprint: str, by_prompt: bool) -> list[str]:
    """Ids of `train` the warm start `adapter_dir` trained on (by content; by prompt too when `by_prompt`)."""
    parent = Path(adapter_dir).parent
    seen_file = parent / SEEN_FILE
    if seen_file.is_file():
        seen = artifacts.read_parquet(seen_file, f"run stage=fit again for {parent}")
        ours = content_keys(train)
        hit = ours["pair"].isin(set(seen["pair"]))
        if by_prompt:
            hit |= ours["prompt"].isin(set(seen["prompt"]))
        return [str(i) for i in train["id"][hit.to_numpy()]]
    state = artifacts.read_state(parent) or {}
    if state.get("data") == train_fingerprint:
        return [str(i) for i in train["id"]]
    log.warning("finetune.init_adapter=%s records no rows it trained on (no %s beside it): make sure it never saw "
                "a row of data.train, or its labels leak into the out-of-fold scores", adapter_dir, SEEN_FILE)
    return []


def check_unseen(adapter_dir: Path, train: pd.DataFrame, train_fingerprint: str, group_by: str) -> None:
    """Refuse a warm start that trained on rows (or, with cv.group_by=prompt, prompts) this experiment scores."""
    by_prompt = group_by == "prompt"
    seen = seen_rows(adapter_dir, train, train_fingerprint, by_prompt)
    if seen:
        what = "pairs or prompts" if by_prompt else "pairs"
        raise UserError(f"finetune.init_adapter={adapter_dir} was trained on {len(seen)} {what} of data.train "
                        f"(first ids {', '.join(seen[:3])}): every fold would start from a model that saw its "
                        "held-out rows; fit the warm start on other rows (make_shared_subset.py --exclude), or drop "
                        "finetune.init_adapter")


def adapter_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own types for a damaged file
        raise UserError(f"{path} is damaged ({type(exc).__name__}); fit the warm start again") from None


def check_fits_model(adapter_dir: Path, model_config: dict | None, base_fingerprint: str | None) -> None:
    """Refuse a warm start made on another base model (its folder's state says which) or of another width."""
    state = artifacts.read_state(Path(adapter_dir).parent) or {}
    if base_fingerprint and state.get("base_model") and state["base_model"] != base_fingerprint:
        raise UserError(f"finetune.init_adapter={adapter_dir} was trained on another base model (fingerprint "
                        f"{state['base_model']}, this model's {base_fingerprint}); a warm start must come from the "
                        "same base model (model=..., model.path=...)")
    if model_config is None:
        return
    hidden, depth = int(model_config["hidden_size"]), int(model_config["num_hidden_layers"])
    for name, shape in adapter_shapes(adapter_dir).items():
        head = ".score." in f".{name}" and name.endswith("weight") and "lora_" not in name
        if head and shape[-1] != hidden:
            raise UserError(f"finetune.init_adapter={adapter_dir}: its score head reads width {shape[-1]}, this model's "
                            f"hidden size is {hidden}; a warm start must come from the same base model")
        layer = next((int(p) for a, p in zip(name.split("."), name.split(".")[1:]) if a == "layers" and p.isdigit()),
                     None)
        if layer is not None and layer >= depth:
            raise UserError(f"finetune.init_adapter={adapter_dir} holds layer {layer}; this model has {depth} "
                            "layers: a warm start must come from the same base model")


def base_model_config(source: Path | str) -> dict | None:
    """config.json of a base model folder on disk; None when there is none to read."""
    try:
        return json.loads((Path(str(source)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def lora_module_names(modules) -> set[str] | None:
    """target_modules as short names (`q_proj`), whether given short or as full module paths; None for all-linear."""
    if modules is None or isinstance(modules, str):
        return None
    return {str(m).split(".")[-1] for m in modules}



def check_start(cfg, train: pd.DataFrame, train_path: Path, source: Path | str | None, scored: bool) -> None:
    """Every check of finetune.init_adapter that needs the data or the base model (validation checked its rank and
    modules): it fits the base model at `source` (when on disk), and with `scored` (a K-fold fine-tune, not a fit)
    it never saw a row of `train`."""
    adapter_dir = Path(str(cfg.finetune.init_adapter))
    on_disk = source is not None and Path(str(source)).is_dir()
    check_fits_model(adapter_dir, base_model_config(source) if on_disk else None,
                     modeling.base_model_fingerprint(source) if on_disk else None)
    if scored:
        check_unseen(adapter_dir, train, artifacts.file_fingerprint(train_path), str(cfg.cv.group_by))


def check_init_adapter(adapter_dir: Path, lora_cfg: DictConfig) -> None:
    """finetune.init_adapter must be a PEFT LoRA folder (safetensors) of the rank and target modules this fine-tune
    trains, or its weights cannot be loaded into the new adapter."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"finetune.init_adapter={adapter_dir}: no adapter there (a PEFT folder with "
                        "adapter_config.json and adapter_model.safetensors is expected, e.g. another experiment's "
                        "finetune/full/adapter)")
    modeling.check_weights_folder(adapter_dir, "adapter_model.safetensors", "adapter_config.json")
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    ours = {"r": lora_cfg.get("r"), "target_modules": lora_cfg.get("target_modules")}
    theirs = {"r": saved.get("r"), "target_modules": saved.get("target_modules")}
    # Short names on both sides: an all-linear fit saves the modules it found, possibly as full module paths.
    our_modules, their_modules = (lora_module_names(m) for m in (ours["target_modules"],
                                                                           theirs["target_modules"]))
    if ours["r"] != theirs["r"] or (our_modules is not None and their_modules is not None
                                     and our_modules != their_modules):
        raise UserError(f"finetune.init_adapter={adapter_dir} has r={theirs['r']}, target_modules="
                        f"{theirs['target_modules']}; this fine-tune trains r={ours['r']}, target_modules="
                        f"{ours['target_modules']}: set finetune.lora to match it")


def load_init_adapter(model, adapter_dir: Path) -> None:
    """Start a fresh LoRA model (add_lora) from a saved adapter: its LoRA matrices and its `score` head, so step 0 of
    the fine-tune is that adapter's model exactly (a warm start, e.g. from a full-data fit on extra rows)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "score" in k]
    if missing:
        raise UserError(f"finetune.init_adapter={adapter_dir}: {len(missing)} of its tensors fit no module of this "
                        f"model (first {missing[0]}); was it trained on another base model?")
    modeling.trainable_in_fp32(model)  # as add_lora left them
