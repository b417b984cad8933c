"""Static and QAT int8 for a small CNN trained on scikit-learn's digits, through a running qaas server.

A real (if small) image classifier: the 1,797 8x8 grey digits bundled with scikit-learn (nothing is
downloaded), a Conv-BN-ReLU x2 + Linear network trained here for a few epochs to ~97 % test accuracy. The
script exports it with torch.export (example batch of 2, dynamic batch dimension), writes the calibration,
training and evaluation sets as .npz files (`x` [N, 1, 8, 8] in 0..1 and `labels`), uploads everything with
the Python client, submits one post-training static job and one quantization-aware training job, follows
them and prints fp32 against int8 accuracy on the held-out quarter, as the server measured it.

    qaas serve &                      # or make run; QAAS_SERVER / QAAS_API_KEY for another server
    python examples/digits_cnn.py     # about a minute on 2 cores; --epochs 3 --iterations 10 for a quick run

Needs torch, numpy and scikit-learn on this side (`pip install -e ".[dev]"` has them). The backend is fbgemm:
with a dynamic batch, the x86 backend keeps a convolution with one input channel in float (README), so
`--backend auto` would compare fbgemm with a partly float x86 model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qaas.client import Client, Job


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three quarters to train on, one to test on: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # [1797, 1, 8, 8] in 0..1
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.75 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        order = torch.randperm(len(xs))
        for start in range(0, len(xs), 64):
            pick = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(xs[pick]), ys[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def prepare(folder: Path, epochs: int, seed: int) -> dict[str, Path]:
    """Train, export and write the datasets: {"model", "calibration", "train", "eval"} -> files."""
    x_train, y_train, x_test, y_test = load_split(seed)
    started = time.perf_counter()
    model = train(x_train, y_train, epochs, seed)
    with torch.no_grad():
        accuracy = 100 * float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    print(
        f"trained for {epochs} epochs in {time.perf_counter() - started:.1f} s: fp32 test accuracy "
        f"{accuracy:.2f} % on {len(x_test)} images"
    )
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.from_numpy(x_train[:2]),), dynamic_shapes={"x": {0: batch}})
    files = {
        "model": folder / "digits.pt2",
        "calibration": folder / "digits-calibration.npz",  # 256 training images are plenty for observers
        "train": folder / "digits-train.npz",
        "eval": folder / "digits-eval.npz",
    }
    torch.export.save(program, files["model"])
    np.savez(files["calibration"], x=x_train[:256], labels=y_train[:256])
    np.savez(files["train"], x=x_train, labels=y_train)
    np.savez(files["eval"], x=x_test, labels=y_test)
    return files


def run_jobs(client: Client, files: dict[str, Path], args: argparse.Namespace) -> list[Job]:
    model = client.upload_model(files["model"])
    datasets = {role: client.upload_dataset(files[role]) for role in ("calibration", "train", "eval")}
    for upload in [client.wait_model(model), *(client.wait_dataset(d) for d in datasets.values())]:
        if upload.status != "ready":
            raise SystemExit(f"{upload.name} is {upload.status}: {upload.error}")
    benchmark = {"batch_sizes": [1, 32], "iterations": args.iterations}
    common = {"backend": args.backend, "eval_dataset_id": datasets["eval"], "benchmark": benchmark}
    submitted = [
        client.submit(
            model,
            mode="static",
            calibration_dataset_id=datasets["calibration"],
            options={"calibration_batches": 32, "batch_size": 8},
            **common,
        ),
        client.submit(
            model,
            mode="qat",
            train_dataset_id=datasets["train"],
            options={
                "activation_observer": "moving_average",  # histogram observers are not used for QAT
                "qat": {"epochs": args.qat_epochs, "learning_rate": 1e-3, "optimizer": "adam"},
            },
            **common,
        ),
    ]

    def show(job: Job) -> None:
        progress = job.progress
        print(
            f"  {job.mode:<6} {job.status:<9} {progress.percent:5.1f}% {progress.stage or '':<12} {progress.message}"
        )

    return [client.wait(job, timeout=600, callback=show) for job in submitted]


def accuracy_table(jobs: list[Job]) -> str:
    lines = [
        f"{'mode':<7} {'backend':<8} {'fp32 acc':>9} {'int8 acc':>9} {'delta':>7} {'size':>7} {'speedup b1':>10}"
    ]
    for job in jobs:
        if job.status != "succeeded" or not job.metrics:
            error = f"{job.error.code}: {job.error.message}" if job.error else ""
            lines.append(f"{job.mode:<7} {job.status}: {error}")
            continue
        acc, size, latency = job.metrics.accuracy, job.metrics.size, job.metrics.latency[0]
        assert acc is not None, "the evaluation set has labels: the job measured accuracy"
        lines.append(
            f"{job.mode:<7} {job.backend_chosen or '':<8} {acc.fp32:>7.2f} % {acc.int8:>7.2f} % "
            f"{acc.delta:>+7.2f} {size.ratio:>6.2f}x {latency.speedup or 0:>9.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="default: $QAAS_SERVER, else http://127.0.0.1:8000")
    parser.add_argument("--key", help="API key (default: $QAAS_API_KEY)")
    parser.add_argument("--epochs", type=int, default=8, help="fp32 training epochs (default 8)")
    parser.add_argument("--qat-epochs", type=int, default=1, help="QAT fine-tuning epochs on the server")
    parser.add_argument("--iterations", type=int, default=50, help="benchmark iterations per batch size")
    parser.add_argument("--backend", choices=("fbgemm", "auto"), default="fbgemm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work", type=Path, help="where to write the model and datasets (default: a temp dir)"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="qaas-digits-") as scratch:
        folder = args.work or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        files = prepare(folder, args.epochs, args.seed)
        with Client(args.server, api_key=args.key, timeout=120) as client:
            jobs = run_jobs(client, files, args)
    print("\ndigits CNN, accuracy on the held-out quarter (measured by the server):")
    print(accuracy_table(jobs))
    return 0 if all(job.status == "succeeded" for job in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
