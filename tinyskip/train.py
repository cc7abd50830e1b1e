"""``python -m tinyskip.train model=l6_d128 [train=layerskip] [run=NAME] [data.path=DIR]``.

Also under ``torchrun --nproc_per_node=N -m tinyskip.train ...`` for data parallelism.
``train=balcony`` trains exit modules on a frozen backbone
(``tinyskip/training/exit_training.py``); every other preset trains a model from scratch
(``tinyskip/training/trainer.py``), or with ``model=hf_llama model.path=...`` continues
the training of a pretrained Llama, every weight (``tinyskip/training/continual.py``).
"""

from __future__ import annotations

from .cli import entry_point
from .jobs import TrainJob
from .training.exit_training import train_exit_modules
from .training.trainer import train


@entry_point("train")
def main(job: TrainJob) -> None:
    result = train_exit_modules(job) if job.train.preset == "balcony" else train(job)
    ev = result.last_eval
    if ev:
        per_exit = " ".join(f"{p:.1f}" for p in ev["val_word_ppl"])
        print(f"run {result.run_dir}: step {result.step}, validation word perplexity by exit: "
              f"{per_exit}, {ev['tokens_per_s']:.0f} train tokens/s")


if __name__ == "__main__":
    main()
