"""``python -m tinyskip.export run=NAME out=FOLDER``: a tinyskip checkpoint as a Hugging Face
Llama folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads. The work is
``export_run`` in ``tinyskip/storage/hf_llama.py``."""

from __future__ import annotations

from .cli import entry_point
from .jobs import ExportJob
from .storage.hf_llama import export_run
from .storage.loading import checkpoint_path


@entry_point("export")
def main(job: ExportJob) -> None:
    out = export_run(checkpoint_path(job.run, job.checkpoint, job.checkpoint_root), job.out,
                     job.dtype)
    print(f"wrote {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    main()
