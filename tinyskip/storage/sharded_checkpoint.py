"""The sharded half of a ``train.parallel=fsdp`` checkpoint: what a resume reads.

Beside the consolidated files every checkpoint has (``model.safetensors`` or the exit
modules' weights, written by rank 0 from the gathered weights, so inference, evaluation
and export never touch a shard), a sharded checkpoint folder holds:

    sharded/.metadata         torch.distributed.checkpoint's index of the shards
    sharded/__<rank>_0.distcp each rank's shard of the trained weights and AdamW moments
    sharded.json              the world size and the file list above
    train_state.pt            the step (and tokens seen), tensors only; no optimizer

Every rank writes its shard into the same temporary folder as rank 0's files, and rank 0
publishes the whole folder with the usual renames (``save_run_folder``): a crash leaves
the old checkpoint or the new one, shards included. A resume loads the shards into
whatever layout it runs with (another number of ranks, or one process): DCP reshards.

DCP's ``.metadata`` is a Python pickle, which DCP reads with ``pickle.load``, and DCP reads
non-tensor values (the optimizer's hyperparameters) with ``torch.load(weights_only=False)``:
both could run code from a crafted checkpoint. Here DCP reads the metadata through an
unpickler that admits only the named classes its metadata is made of (and shard file names
without a path), and each non-tensor value with ``weights_only=True`` first; anything else
is refused in one line.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..atomic import write_json_atomic
from ..config import first_line
from .checkpoint import CheckpointError, read_json

SHARDS, MANIFEST = "sharded", "sharded.json"


def write_shards(folder: Optional[Path], module: nn.Module, optimizer) -> None:
    """Every rank's shard of ``module`` and ``optimizer`` into ``folder/sharded``: rank 0
    names the (temporary) folder, the other ranks pass None. Every rank must call it."""
    box = [str(folder) if folder is not None else None]
    dist.broadcast_object_list(box, src=0)
    folder = Path(box[0])
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder / SHARDS)
    if dist.get_rank() == 0:        # dcp.save returns once every rank's file is written
        files = sorted(p.name for p in (folder / SHARDS).iterdir())
        write_json_atomic(folder / MANIFEST, {"world_size": dist.get_world_size(),
                                              "files": files})


def save_sharded(save: Callable[[Callable[[Path], None]], Path], module: nn.Module,
                 optimizer) -> None:
    """A sharded checkpoint: rank 0 runs ``save(also)``, the usual atomic save of the
    consolidated files, and ``also`` adds every rank's shard to its temporary folder
    before it is published; the other ranks only write their shard. Every rank calls it."""
    if dist.get_rank() == 0:
        save(lambda tmp: write_shards(tmp, module, optimizer))
    else:
        write_shards(None, module, optimizer)


def sharded(folder: Path) -> bool:
    """Whether a checkpoint folder is sharded; a sharded one must be complete (checked
    before any process group forms, so that a missing shard is one line)."""
    if not (folder / MANIFEST).is_file():
        if (folder / SHARDS).exists():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {SHARDS}/ without the "
                                  f"{MANIFEST} that lists its files")
        return False
    manifest = read_json(folder / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        raise CheckpointError(f"{folder / MANIFEST} is corrupted (no file list)")
    missing = [f for f in files if not (folder / SHARDS / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {SHARDS}/{missing[0]}"
                              f" ({len(missing)} of the {len(files)} files its "
                              f"{manifest.get('world_size')} ranks wrote)")
    return True


def load_shards(folder: Path, module: nn.Module, optimizer) -> None:
    """Load a sharded checkpoint's weights and optimizer state into ``module`` and
    ``optimizer`` as they are laid out now (sharded over any number of ranks, or whole).
    Every rank must call it."""
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        with warnings.catch_warnings():
            # One process resuming a sharded run is meant: DCP warns that it "assumes" so.
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=_SafeReader(folder / SHARDS),
                     planner=_TensorsOnlyPlanner())
    except (Exception, CheckpointException) as e:
        # DCP reports every rank's failure in one CheckpointException (a BaseException):
        # the first rank's first line is the one-line reason.
        failures = getattr(e, "failures", None)
        cause = next(iter(failures.values())) if failures else e
        cause = getattr(cause, "exc", cause)       # (a rank's exception, wrapped)
        if isinstance(cause, CheckpointError):
            raise cause from None
        raise CheckpointError(f"checkpoint {folder}: its shards do not load into this run "
                              f"({type(cause).__name__}: {first_line(cause)})") from None
    set_state_dict(module, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


# Everything DCP's metadata pickle is made of (torch 2.13), by exact name: a name a pickle
# may resolve through a module (``metadata.os.system``, protocol 4 and later) is refused.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                 "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _METADATA_CLASSES and not dtype:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return super().find_class(module, name)


class _SafeReader(FileSystemReader):
    """DCP's file reader, with the metadata read by ``_MetadataUnpickler`` and its shard
    files checked to be names inside the folder (not paths out of it)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if not isinstance(metadata, Metadata):
                raise TypeError(f"a {type(metadata).__name__}, not DCP's Metadata")
            for info in (metadata.storage_data or {}).values():
                name = str(info.relative_path)
                if Path(name).name != name or name in ("", ".", ".."):
                    raise ValueError(f"shard file {name!r} is not a name in the folder")
        except Exception as e:  # anything a torn or crafted file raises
            raise CheckpointError(f"{path} is not shard metadata DCP wrote ({first_line(e)})")
        if metadata.storage_meta is None:          # (as DCP's own reader does)
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's planner, with non-tensor values read as ``weights_only`` first."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        data = value.getvalue()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:  # weights_only refuses any global it does not know
            raise CheckpointError(f"a shard's value {read_item.dest_index.fqn} is not plain "
                                  f"data ({first_line(e)})")
        super().load_bytes(read_item, io.BytesIO(data))
