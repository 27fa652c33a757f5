"""A tiny colour classifier trained for a few epochs, one checkpoint per epoch, saved the way
different training scripts save them (Lightning, the ImageNet example, a bare state_dict named
by epoch and step, DataParallel prefixes, safetensors with metadata), with scrambled
modification times and a broken file in the middle of the run.

The learning rate is low on purpose: early checkpoints get several images wrong and later ones
right, so predictions change and there are flips to find."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.datasets.models import CLASS_NAMES, COLOURS, ColourNet, colour_image

EPOCHS = 5
STEPS_PER_EPOCH = 6
SIDE = 16


@dataclass(frozen=True)
class SavedCheckpoint:
    file: str
    epoch: int
    step: int
    state_dict: dict[str, torch.Tensor]


def train_epochs(seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """State dicts after each of EPOCHS epochs of SGD on clean colour images."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ColourNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.007)
    states = []
    for _ in range(EPOCHS):
        for _ in range(STEPS_PER_EPOCH):
            labels = rng.integers(0, len(CLASS_NAMES), size=16)
            images = np.stack([colour_image(rng, COLOURS[CLASS_NAMES[label]], side=SIDE)
                               for label in labels])
            batch = (torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255 - 0.5) / 0.5
            loss = nn.functional.cross_entropy(model(batch), torch.from_numpy(labels))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        states.append({name: value.detach().clone() for name, value in
                       model.state_dict().items()})
    return states


def write_run(directory: Path, states: list[dict[str, torch.Tensor]], *,
              broken: bool = True) -> list[SavedCheckpoint]:
    """Save ``states`` (one per epoch) in mixed shapes with scrambled mtimes; return them in
    true training order (the broken file is not among them)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "convscope.toml").write_text(
        '[model]\nfactory = "tests.datasets.models:ColourNet"\n'
        f"[preprocess]\ninput_size = [{SIDE}, {SIDE}]\nresize = 0\n"
        "mean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n", encoding="utf-8")
    (directory / "labels.txt").write_text("\n".join(CLASS_NAMES) + "\n", encoding="utf-8")
    saved = []
    for epoch, state in enumerate(states):
        step = (epoch + 1) * STEPS_PER_EPOCH
        if epoch == 0:      # Lightning: epoch + global_step + state_dict + optimizer states
            file = "lightning-last.ckpt"
            torch.save({"epoch": epoch, "global_step": step, "state_dict": state,
                        "optimizer_states": [{"lr": torch.tensor(0.02)}],
                        "pytorch-lightning_version": "2.4.0"}, directory / file)
        elif epoch == 1:    # the ImageNet example, DataParallel-prefixed, counters as tensors
            file = "checkpoint.pth"
            torch.save({"epoch": torch.tensor(epoch), "step": np.int64(step),
                        "model_state_dict": {f"module.{k}": v for k, v in state.items()},
                        "best_acc1": 0.5}, directory / file)
        elif epoch == 2:    # a hand-written loop: {"model": ..., "iteration": ...}, nested meta
            file = "zz-snapshot.pt"
            torch.save({"model": state, "meta": {"epoch": epoch, "iteration": step}},
                       directory / file)
        elif epoch == 3:    # a bare state_dict: the name says where it belongs
            file = f"epoch={epoch}-step={step}.pt"
            torch.save(state, directory / file)
        else:               # safetensors with string metadata
            file = "aaa-final.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(directory / file),
                      metadata={"epoch": str(epoch), "global_step": str(step)})
        saved.append(SavedCheckpoint(file, epoch, step, state))
    if broken:  # between epoch 2 and epoch 3, by its name; not a checkpoint at all
        (directory / "epoch=2-step=20.pt").write_bytes(b"PK\x03\x04 truncated by a full disk")
    # Scrambled modification times: newest first is the reverse of training (plus noise).
    now = time.time()
    names = [checkpoint.file for checkpoint in saved] + (["epoch=2-step=20.pt"] if broken else [])
    for number, name in enumerate(names):
        stamp = now - 600 + (len(names) - number) * 37 + (number % 2) * 5
        os.utime(directory / name, (stamp, stamp))
    return saved
