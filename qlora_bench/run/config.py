"""A run configuration (model + Settings + run options) and its stable identity, used to resume sweeps."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..schema import load
from ..settings import Settings
from .train import RunOptions


def model_label(model: str) -> str:
    """The model part of a readable id: the profile's name for a profile, alias or known hub id ('8b' ->
    'llama-3.1-8b'), the folder's name for .../config.json (the file's stem for another .json), else the last
    path part (a model folder, or the name of a hub id)."""
    from ..profiles import profile_name

    if profile_name(model):
        return profile_name(model)
    path = Path(model.strip().rstrip("/"))
    if path.suffix.lower() == ".json":
        label = path.absolute().parent.name if path.name.lower() == "config.json" else path.stem
    else:
        label = path.name
    return re.sub(r"[^\w.-]+", "_", label or model).lower()


@dataclass(frozen=True)
class RunConfig:
    model: str  # as the user gave it: profile name, config.json path or hub id
    settings: Settings
    options: RunOptions = field(default_factory=RunOptions)

    def to_dict(self) -> dict:
        return {"model": self.model, "settings": self.settings.to_dict(), "options": asdict(self.options)}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(d["model"], Settings.from_dict(d["settings"]), load(RunOptions, d.get("options", {}), "options"))

    @property
    def key(self) -> str:
        """Hash of everything that defines the measurement (resume skips configurations with a known key)."""
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(blob.encode(), usedforsecurity=False).hexdigest()[:12]

    @property
    def name(self) -> str:
        s = self.settings
        parts = [model_label(self.model), s.method]
        if s.uses_adapters:
            parts.append(f"r{s.rank}")
        if s.method == "qlora":
            parts.append(f"{s.quant}-{'dq' if s.double_quant else 'nodq'}")
        parts += [s.optimizer, f"bs{s.batch}x{s.seq}", "gc" if s.gradient_checkpointing else "nogc", s.attn]
        if self.options.trainer != "loop":
            parts.append(self.options.trainer)
        return "/".join(parts)

    @property
    def id(self) -> str:
        return f"{self.name}#{self.key}"
