"""``python killed_run.py STEP <tinyskip.train overrides>``: a training run, under torchrun
or not, whose rank 0 is SIGKILLed as soon as the checkpoint of step STEP is published (a
crash at a known point: polling for a checkpoint races a tiny model's fast steps)."""

import os
import runpy
import signal
import sys

from tinyskip.training import continual, exit_training, trainer

STEP = int(sys.argv.pop(1))


def killed_after(save):
    def save_then_die(run_dir, model, *args, **kwargs):
        folder = save(run_dir, model, *args, **kwargs)
        train_state = args[1] if len(args) > 1 else kwargs.get("train_state")
        if train_state["step"] == STEP:
            os.kill(os.getpid(), signal.SIGKILL)
        return folder
    return save_then_die


trainer.save_checkpoint = killed_after(trainer.save_checkpoint)
continual.save_continual_checkpoint = killed_after(continual.save_continual_checkpoint)
exit_training.save_exit_modules = killed_after(exit_training.save_exit_modules)
runpy.run_module("tinyskip.train", run_name="__main__", alter_sys=True)
