"""CALM's early-exit classifier: a linear layer per checked exit, on the frozen model's
pre-norm hidden state at that exit, predicting whether the exit's argmax equals the
last exit's (the label). It costs a d-dimensional dot product per check instead of a
head call, which is what makes checking every exit affordable at small widths.

CALM's classifier has two outputs trained with class-balanced cross-entropy; a 2-way
softmax is a sigmoid of the difference of its two logits, so one logit per exit with a
class-balanced logistic loss is the same model with half the parameters. Trained in a
second stage with the model frozen, and saved beside the checkpoint with the weight hash
of the model it was trained on (``exit_classifier.safetensors``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from ..atomic import write_bytes_atomic
from ..config import UserError
from .exits import ExitHead
from .transformer import Transformer

FILE = "exit_classifier.safetensors"


@dataclass
class ExitClassifier:
    exits: list[int]               # the checked exits it was trained for
    weight: torch.Tensor           # (n_exits, d)
    bias: torch.Tensor             # (n_exits,)
    weights_hash: str              # of the model it was trained on

    def to(self, device) -> "ExitClassifier":
        return ExitClassifier(self.exits, self.weight.to(device), self.bias.to(device),
                              self.weights_hash)

    def confidence(self, exit: int, h: torch.Tensor) -> float:
        """P(exit's argmax == last exit's argmax) for one (d,) pre-norm hidden state."""
        i = self.exits.index(exit)
        return float(torch.sigmoid(h.float() @ self.weight[i] + self.bias[i]))


@torch.no_grad()
def exit_examples(model: Transformer, tokens: np.ndarray, exits: list[int], n_windows: int,
                  seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced states (n_exits, N, d) at the exits and labels (n_exits, N) from
    ``n_windows`` random windows of a token array."""
    g = np.random.default_rng(seed)
    starts = g.integers(0, tokens.size - seq_len, n_windows)
    ids = torch.from_numpy(np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int64))
    ids = ids.to(next(model.parameters()).device)
    head, L = ExitHead(model), model.num_layers
    h, states = model.embed(ids), {}
    for layer in range(L):
        h = model.run_layers(h, layer, layer + 1)
        if layer + 1 in exits:
            states[layer + 1] = h                                        # (B, T, d)
    final = head.logits(h, L).argmax(-1).flatten()
    labels = [(head.logits(states[e], e).argmax(-1).flatten() == final).float() for e in exits]
    # (B, T, d) -> (N, d) per exit, N = B * T
    return torch.stack([states[e].flatten(0, 1).float() for e in exits]), torch.stack(labels)


def train_exit_classifier(states: torch.Tensor, labels: torch.Tensor, exits: list[int],
                          weights_hash: str, steps: int = 300, lr: float = 0.05) -> ExitClassifier:
    """Class-balanced logistic regression per exit, full batch (the model stays frozen)."""
    n, N, d = states.shape
    # Standardise the inputs so one learning rate fits every exit's scale.
    mean, std = states.mean(1, keepdim=True), states.std(1, keepdim=True) + 1e-6
    x = (states - mean) / std
    w = torch.zeros(n, d, device=states.device, requires_grad=True)
    b = torch.zeros(n, device=states.device, requires_grad=True)
    pos = labels.mean(1, keepdim=True).clamp(1e-3, 1 - 1e-3)                # (n, 1)
    balance = torch.where(labels > 0, 0.5 / pos, 0.5 / (1 - pos))           # (n, N)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        logits = torch.einsum("end,ed->en", x, w) + b[:, None]
        loss = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
                * balance).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():       # fold the standardisation into the weights
        weight = w / std[:, 0]
        bias = b - (mean[:, 0] * weight).sum(-1)
    return ExitClassifier(list(exits), weight.detach(), bias.detach(), weights_hash)


def save_exit_classifier(clf: ExitClassifier, path: Path) -> None:
    meta = {"exits": json.dumps(clf.exits), "weights_hash": clf.weights_hash}
    write_bytes_atomic(path, save({"weight": clf.weight.contiguous(),
                                   "bias": clf.bias.contiguous()}, metadata=meta))


def load_exit_classifier(path: Path, weights_hash: str) -> ExitClassifier:
    """The classifier at ``path``, refused when it was trained on other weights."""
    if not path.is_file():
        raise UserError(f"measure=classifier needs a trained exit classifier at {path} "
                        "(python -m tinyskip.calibrate measure=classifier trains one)")
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load(path.read_bytes())
        clf = ExitClassifier(json.loads(meta["exits"]), tensors["weight"], tensors["bias"],
                             meta["weights_hash"])
    except Exception as e:     # safetensors raises its own error types on corrupt files
        raise UserError(f"exit classifier {path} is unreadable ({type(e).__name__}: {e})")
    if clf.weights_hash != weights_hash:
        raise UserError(f"exit classifier {path} was trained on other weights: retrain it with "
                        "python -m tinyskip.calibrate measure=classifier")
    return clf
