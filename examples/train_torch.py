"""PyTorch training that survives Ctrl+C, SIGTERM, SIGKILL and crashes.

An encoder/decoder regression model with two optimizers and two learning-rate
schedulers, trained epoch by epoch on a synthetic data set with a shuffled
``DataLoader``. ``run.epochs()`` and ``run.batches()`` make one batch one
step, so a stop in the middle of an epoch resumes at the very next batch, and
the validation pass at each epoch's end runs exactly once per epoch. The best
checkpoint by ``val_loss`` is kept besides the newest ones. The model
configuration is saved in every checkpoint, so the model can be rebuilt from
a checkpoint alone, and the encoder can be loaded on its own::

    python examples/train_torch.py --dir runs/torch          # Ctrl+C, then again:
    python examples/train_torch.py --dir runs/torch          # continues

    store = killsafe.CheckpointStore("runs/torch/checkpoints")
    config = store.load("latest", subtree="config")
    encoder = build_encoder(config)
    encoder.load_state_dict(store.load("latest", subtree="encoder"))

The last line printed is ``result: ...``: the same for an uninterrupted run and
for one stopped and resumed any number of times. ``--small`` (or the
environment variable ``KILLSAFE_EXAMPLE_SMALL=1``) runs a tiny version.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import killsafe


def build_encoder(config: dict[str, Any]) -> nn.Module:
    return nn.Sequential(
        nn.Linear(config["inputs"], config["hidden"]),
        nn.GELU(),
        nn.Dropout(config["dropout"]),
        nn.Linear(config["hidden"], config["latent"]),
    )


def build_decoder(config: dict[str, Any]) -> nn.Module:
    return nn.Sequential(
        nn.Linear(config["latent"], config["hidden"]),
        nn.GELU(),
        nn.Linear(config["hidden"], config["outputs"]),
    )


def make_data(config: dict[str, Any], n: int, seed: int) -> torch.utils.data.TensorDataset:
    """A fixed regression problem: targets are a noisy non-linear map of the inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(config["inputs"], config["outputs"], generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, config["inputs"], generator=g)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(n, config["outputs"], generator=g)
    return torch.utils.data.TensorDataset(x, y)


def params_sha(*modules: nn.Module) -> str:
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    killsafe.add_arguments(parser, directory="runs/train_torch")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--small", action="store_true", help="a tiny run for tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("KILLSAFE_EXAMPLE_SMALL") == "1"

    torch.set_num_threads(1)  # bit-identical results between runs
    torch.manual_seed(args.seed)
    config = {
        "inputs": 32,
        "hidden": 64 if small else 256,
        "latent": 8,
        "outputs": 4,
        "dropout": 0.1,
        "batch_size": 32,
        "train_size": 2048 if small else 24576,
        "epochs": args.epochs or (3 if small else 12),
    }
    encoder, decoder = build_encoder(config), build_decoder(config)
    enc_opt = torch.optim.AdamW(encoder.parameters(), lr=3e-3, weight_decay=1e-4)
    dec_opt = torch.optim.SGD(decoder.parameters(), lr=5e-2, momentum=0.9)
    train = torch.utils.data.DataLoader(
        make_data(config, config["train_size"], seed=1),
        batch_size=config["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    per_epoch = len(train)
    total = per_epoch * config["epochs"]
    enc_sched = torch.optim.lr_scheduler.StepLR(enc_opt, step_size=per_epoch, gamma=0.7)
    dec_sched = torch.optim.lr_scheduler.CosineAnnealingLR(dec_opt, T_max=total)
    val = make_data(config, 512, seed=2)
    loss_fn = nn.MSELoss()

    def validate() -> float:
        encoder.eval()
        decoder.eval()
        with torch.no_grad():
            loss = loss_fn(decoder(encoder(val.tensors[0])), val.tensors[1]).item()
        encoder.train()
        decoder.train()
        return loss

    with killsafe.Run.from_args(
        args,
        save_every_steps=max(1, per_epoch // 2),
        best=("val_loss", "min"),
        keep_last=2,
        config=config,
    ) as run:
        run.track(
            config=config,
            encoder=encoder,
            decoder=decoder,
            enc_opt=enc_opt,
            dec_opt=dec_opt,
            enc_sched=enc_sched,
            dec_sched=dec_sched,
            best={"val_loss": float("inf"), "epoch": -1},
        )
        for epoch in run.epochs(config["epochs"]):
            for x, y in run.batches(train):  # one batch is one step
                loss = loss_fn(decoder(encoder(x)), y)
                enc_opt.zero_grad()
                dec_opt.zero_grad()
                loss.backward()
                enc_opt.step()
                dec_opt.step()
                enc_sched.step()
                dec_sched.step()
                run.log(loss=loss.item())
            val_loss = validate()  # the epoch's end code: once per epoch, across resumes too
            best = run.state["best"]
            if val_loss < best["val_loss"]:
                best.update(val_loss=val_loss, epoch=epoch + 1)
            run.log(val_loss=val_loss)
    if run.exit_reason != "finished":
        return
    best = run.state["best"]
    print(
        f"result: best_val_loss={best['val_loss']:.6f} best_epoch={best['epoch']} "
        f"final_val_loss={validate():.6f} params_sha={params_sha(encoder, decoder)}",
        flush=True,
    )
    show_encoder_alone(Path(run.directory))


def show_encoder_alone(directory: Path) -> None:
    """Rebuild the encoder from the best checkpoint alone: its config and its weights."""
    store = killsafe.CheckpointStore(directory / "checkpoints", best=("val_loss", "min"))
    best = store.best() or store.latest()
    assert best is not None
    config = store.load(best, subtree="config")
    encoder = build_encoder(config)
    encoder.load_state_dict(store.load(best, subtree="encoder"))
    print(f"encoder: rebuilt from {best.path} alone, latent={config['latent']}", file=sys.stderr)


if __name__ == "__main__":
    main()
