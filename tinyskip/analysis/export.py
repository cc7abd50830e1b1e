"""The export job behind ``python -m tinyskip.export``: a run as a Hugging Face Llama folder
others can use, and its upload to the Hub.

The folder holds the backbone (``storage/hf_llama.export_hf``), a README.md model card
(``storage/model_card.py``) and, when the run has them, its exit modules (``exits/``) and its
calibration (``calibration.json``), all written in the one temporary folder that is
published by a rename. Exit modules and calibration are keyed by weight hashes, so they
are re-keyed to the exported weights file; a calibration only when the export holds the
very weights it was made on (its guarantee covers nothing else), or it is left out.
``model=hf_llama model.path=<export>`` then loads the modules attached, and
``infer mode=dee`` finds the calibration, as for the run itself.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..atomic import write_json_atomic, write_text_atomic
from ..config import UserError, first_line
from ..jobs import ExportJob
from ..model.transformer import Transformer
from ..runtime import DTYPES, pick_device
from ..storage.checkpoint import load_run_job
from ..storage.exit_checkpoint import EXITS, META, WEIGHTS, backbone_hash, read_exit_meta
from ..storage.hf_llama import TOKENIZER_FILES, export_hf
from ..storage.loading import (Loaded, default_calibration, load_source, read_calibration,
                               results_hash, run_data_config)
from ..storage.model_card import CardFacts, model_card
from .evaluation import exit_quality


@dataclass
class Exported:
    folder: Path
    card: CardFacts
    note: Optional[str]          # one line when the run's calibration was left out


def exported_exactly(model: Transformer, dtype: torch.dtype) -> bool:
    """Whether the weights written at ``dtype`` read back as the model's own."""
    return all(torch.equal(t.to(dtype).to(t.dtype), t) for t in model.state_dict().values())


@torch.no_grad()
def _round_to(model: Transformer, dtype: torch.dtype) -> None:
    """Give the model in memory the exported weights' values, so that the card's numbers
    are the export's (the run's own weights are not needed once the file is written)."""
    for t in model.state_dict().values():
        t.copy_(t.to(dtype))


def _calibration(loaded: Loaded, exact: bool, dtype: str) -> tuple[Optional[dict], Optional[str]]:
    """The run's calibration when it may travel, else None and why not (None: no file)."""
    path = default_calibration(loaded)
    if not path.is_file():
        return None, None
    try:
        read_calibration(path, loaded)      # made for these weights, and a calibration file
    except UserError as e:
        return None, f"calibration left out: {e}"
    if not exact:
        return None, (f"calibration left out: dtype={dtype} rounds the weights {path} was made "
                      "on, and a calibration's guarantee covers only those weights")
    return json.loads(path.read_text(encoding="utf-8")), None


def export_job(job: ExportJob) -> Exported:
    device = pick_device(job.device)
    loaded = load_source(job.run, job.checkpoint, job.checkpoint_root, None, device)
    model, dtype, out = loaded.model, DTYPES[job.dtype], Path(job.out)
    exact = exported_exactly(model, dtype)
    cal, note = _calibration(loaded, exact, job.dtype)
    card = CardFacts(
        name=out.resolve().name, ref=job.push or str(out.resolve()), license=job.license,
        dtype=job.dtype, config=model.config,
        n_params=sum(p.numel() for p in model.parameters()),
        job=load_run_job(loaded.run_dir) if loaded.run_dir else None,
        data=run_data_config(loaded.run_dir, job.data), calibration_note=note,
        line_break=(loaded.tokenizer.sp.id_to_piece(loaded.tokenizer.sp.eos_id())
                    if loaded.fmt == "tinyskip" else None))

    def fill(folder: Path) -> None:
        if loaded.fmt == "hf":
            for name in TOKENIZER_FILES:
                if (Path(loaded.source) / name).is_file():
                    shutil.copyfile(Path(loaded.source) / name, folder / name)
        if not exact:
            _round_to(model, dtype)
        if job.evaluate:
            card.numbers = exit_quality(loaded, card.data, "test", max_batches=job.eval_batches)
        exits = None
        if loaded.exits is not None:
            # The modules travel at any dtype (as infer dtype=bfloat16 runs them on a cast
            # backbone): re-keyed to the exported file, their backbone recorded as the
            # folder above them (load_source reads a relative path from exits/).
            exits = folder / EXITS
            exits.mkdir()
            shutil.copyfile(loaded.exits / WEIGHTS, exits / WEIGHTS)
            card.exits = read_exit_meta(loaded.exits)
            card.exits["backbone"] = {"path": "..", "format": "hf",
                                      "weights_hash": backbone_hash(folder)}
            write_json_atomic(exits / META, card.exits)
        if cal is not None:
            cal["exported_from"] = {"checkpoint": cal["checkpoint"],
                                    "weights_hash": cal["weights_hash"]}
            cal["checkpoint"] = "."             # the folder the file is in
            cal["weights_hash"] = results_hash(backbone_hash(folder), exits)
            write_json_atomic(folder / "calibration.json", cal)
            card.calibration = cal
        write_text_atomic(folder / "README.md", model_card(card))

    export_hf(model, loaded.tokenizer_file if loaded.fmt == "tinyskip" else None, out, dtype,
              fill)
    return Exported(out, card, note)


def upload_files(folder: Path) -> list[str]:
    """Every file of an export by its path in the repo: what ``push`` gives upload_folder."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def push(folder: Path, repo_id: str) -> str:
    """Upload an export to a Hub model repo (created if missing); its commit URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("push= needs huggingface_hub: pip install -e '.[hf]'")
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder,
                                   allow_patterns=upload_files(folder),
                                   # a file an earlier push left (an exits/ folder this export
                                   # lacks) would be loaded with this one's weights
                                   delete_patterns="*",
                                   commit_message=f"tinyskip export {folder.name}")
    except Exception as e:  # network, authentication, permissions: all one line
        raise UserError(f"cannot upload {folder} as {repo_id} to the Hub: {first_line(e)}")
    return commit.commit_url
