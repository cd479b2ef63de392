"""asrprune: sensitivity-aware one-shot pruning of Whisper speech-recognition models.

The public API is re-exported here lazily, so that ``import asrprune`` (and the torch-free
``asrprune.report``) does not import torch or transformers until a model function is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> defining module
_API = {
    "load_model": "models",
    "convert_ctranslate2": "models",
    "list_models": "models",
    "model_fingerprint": "models",
    "BUILTIN_MODELS": "models",
    "DEFAULT_MODEL": "models",
    "Utterance": "manifests",
    "SpeechSet": "manifests",
    "read_speech_set": "manifests",
    "load_audio": "audio",
    "check_disjoint": "overlap",
    "PlanEntry": "config",
    "PrunePlan": "config",
    "list_components": "components",
    "select_parameters": "components",
    "prune_model": "prune",
    "PruneResult": "prune",
    "DecodeOptions": "decoding",
    "evaluate": "evaluation",
    "compare": "evaluation",
    "score_sensitivity": "sensitivity",
    "allocate_plan": "allocate",
    "save_pruned": "export",
    "save_compressed": "export",
    "load_compressed": "export",
    "export_ctranslate2": "export",
    "build_report": "report",
    "StudySpec": "study",
    "reproduce": "study",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module = importlib.import_module(f"asrprune.{_API[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'asrprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
