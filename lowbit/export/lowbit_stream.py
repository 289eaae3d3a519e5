"""lowbit's directory written layer by layer, for models larger than memory (`lowbit quantize --lazy`).

Each finished decoder layer goes to a shard of its own in a temporary directory beside OUT (.OUT.stream)
(model-000NN-of-000MM.safetensors: layer NN-1), so a layer's tensors leave memory as soon as it is
quantized; `finish` writes the rest (embedding, final norm, head: shard MM), the index
model.safetensors.index.json, config, tokenizer and lowbit.json, and renames the directory into
place: atomic as a whole. `load_quantized` reads the shards through the index.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.load import Loaded
from ..nn.qstate import pack_module
from .lowbit_dir import INDEX, MANIFEST, _manifest, _state, check_out, replace_dir


class LayerStream:
    """Receives finished layers (`add_layer`, the quantize verb's on_layer_done), then `finish`."""

    def __init__(self, loaded: Loaded, out: Path, overwrite: bool = False):
        self.loaded, self.out, self.overwrite = loaded, Path(out), overwrite
        check_out(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        # one fixed name beside OUT: what a killed run left there is cleared (a resumed run rewrites its
        # finished layers from the checkpoint)
        self.tmp = self.out.parent / f".{self.out.name}.stream"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.shards = loaded.dims.n_layers + 1
        self.weight_map: dict[str, str] = {}
        self.entries: dict[str, dict] = {}

    def _shard(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.shards:05d}.safetensors"

    def add_layer(self, index: int, layer: torch.nn.Module) -> None:
        """Write decoder layer `index` (its QuantLinears packed, its other tensors as they are)."""
        prefix = f"{self.loaded.spec.layers}.{index}."
        tensors, entries = pack_module(layer)
        name = self._shard(index + 1)
        save_file({prefix + k: v for k, v in tensors.items()}, str(self.tmp / name), metadata={"format": "pt"})
        self.weight_map.update({prefix + k: name for k in tensors})
        self.entries.update({prefix + k: e for k, e in entries.items()})

    def finish(self, method: dict) -> Path:
        """Write everything outside the decoder layers and move the directory to OUT."""
        loaded, layers = self.loaded, self.loaded.spec.layers + "."
        try:
            if loaded.weights is not None:             # a float head still unread (lazy): read it now
                from ..models.lazy import materialize

                embed = loaded.model.get_submodule(loaded.spec.embed)
                if embed.weight.is_meta:                # dropped once the walk had its first inputs
                    materialize(embed, loaded.spec.embed + ".", loaded.weights)
                    if loaded.model.config.tie_word_embeddings:
                        loaded.model.tie_weights()
                head = loaded.model.get_submodule(loaded.spec.head)
                if not loaded.model.config.tie_word_embeddings and head.weight.is_meta:
                    materialize(head, loaded.spec.head + ".", loaded.weights)
            tensors, entries = _state(loaded, exclude=layers)
            name = self._shard(self.shards)
            save_file(tensors, str(self.tmp / name), metadata={"format": "pt"})
            self.weight_map.update({k: name for k in tensors})
            entries = {**self.entries, **entries}
            (self.tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))},
                                                     indent=1))
            loaded.model.config.save_pretrained(self.tmp)
            loaded.tokenizer.save_pretrained(self.tmp)
            (self.tmp / MANIFEST).write_text(json.dumps(_manifest(loaded, method, entries), indent=1))
            replace_dir(self.tmp, self.out)
        except BaseException:
            self.abort()
            raise
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
