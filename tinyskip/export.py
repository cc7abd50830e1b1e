"""``python -m tinyskip.export run=NAME out=FOLDER``: a tinyskip checkpoint as a Hugging Face
Llama folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path

from .cli import entry_point
from .jobs import ExportJob
from .runtime import DTYPES
from .storage.checkpoint import load_model, resolve_checkpoint
from .storage.hf_llama import export_hf
from .storage.loading import checkpoint_path


def export_run(path: Path | str, out: Path | str, dtype: str = "float32") -> Path:
    ckpt = resolve_checkpoint(path)
    model, _ = load_model(ckpt)
    return export_hf(model, ckpt / "tokenizer.model", Path(out), DTYPES[dtype])


@entry_point("export")
def main(job: ExportJob) -> None:
    out = export_run(checkpoint_path(job.run, job.checkpoint, job.checkpoint_root), job.out,
                     job.dtype)
    print(f"wrote {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    main()
