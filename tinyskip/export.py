"""``python -m tinyskip.export run=NAME out=FOLDER [push=OWNER/NAME]``: a tinyskip run as a
Hugging Face Llama folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads,
with a model card and the run's exit modules and calibration, optionally uploaded to the
Hub. The work is ``tinyskip/analysis/export.py``."""

from __future__ import annotations

from .cli import entry_point
from .jobs import ExportJob
from .analysis.export import export_job, push


@entry_point("export")
def main(job: ExportJob) -> None:
    done = export_job(job)
    if done.note:
        print(done.note)
    print(f"wrote {done.folder} (load it with transformers.AutoModelForCausalLM.from_pretrained "
          "or model=hf_llama model.path=...)", flush=True)
    if job.push:
        print(f"uploaded to {push(done.folder, job.push)}")


if __name__ == "__main__":
    main()
