"""Dynamic int8 for a Hugging Face BERT classifier folder, through a running qaas server.

Nothing is downloaded: the script builds a small `BertForSequenceClassification` from a `BertConfig` with
RANDOM weights (so its predictions mean nothing; the size and fidelity numbers are still real), and a WordPiece
tokenizer from a vocabulary written here. It saves both the way a trained model is shared,
`save_pretrained(folder, safe_serialization=True)` (config.json, model.safetensors, tokenizer files), zips the
folder, uploads it with a few JSONL sentences to verify on, and runs a dynamic job with
`quantize_embeddings: true` (Linear layers and the word embeddings in int8). It prints the size, the cosine
and SQNR of the int8 hidden states against fp32 on those sentences, and the latency.

    qaas serve &                       # or make run; QAAS_SERVER / QAAS_API_KEY for another server
    python examples/bert_dynamic.py    # under a minute on 2 cores; --layers 1 --hidden 64 for a quick run

For your own model: zip the folder `save_pretrained` wrote (with its tokenizer) and upload the zip. The server
loads it with `AutoModel` (bert, distilbert, roberta): a task head such as the classifier here is not part of
the quantized encoder, whose output is the last hidden state.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from pathlib import Path

from qaas.client import Client, Job

WORDS = [
    "the", "a", "cat", "dog", "sat", "on", "mat", "film", "was", "good", "bad", "very", "not", "great", "movie",
    "plot", "actor", "acting", "story",
]  # fmt: skip
SENTENCES = [
    "the film was very good",
    "the movie was not good",
    "a great story",
    "the acting was bad",
    "the cat sat on the mat",
    "a very bad plot",
    "the actor was great",
    "not a good movie",
]


def build_model_folder(folder: Path, hidden: int, layers: int, seed: int) -> Path:
    """A random-weight BertForSequenceClassification and its tokenizer, saved as safetensors."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    from transformers.utils import logging

    logging.disable_progress_bar()

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(f"##{c}" for c in "sdegin")]
    vocab_dir = folder.parent / f"{folder.name}-vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast.from_pretrained(str(vocab_dir), local_files_only=True)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
        num_labels=2,
    )
    model = BertForSequenceClassification(config).eval()  # random weights: nothing to download
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"built a random-weight BERT classifier: {layers} layers, hidden {hidden}, {parameters:,} parameters"
    )
    return folder


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.iterdir()):
            zf.write(file, file.name)
    return archive


def summary(job: Job) -> str:
    if job.status != "succeeded" or not job.metrics:
        error = f"{job.error.code}: {job.error.message}" if job.error else ""
        return f"job {job.id} {job.status}: {error}"
    metrics = job.metrics  # typed: qaas.contract.metrics.JobMetrics
    size, fidelity = metrics.size, metrics.fidelity
    quantized = metrics.layers.quantized if metrics.layers else "?"
    lines = [
        f"job {job.id}: dynamic int8, backend {job.backend_chosen}, {quantized} layers in int8",
        f"size      fp32 {size.fp32_bytes / 1e6:8.2f} MB   int8 {size.int8_bytes / 1e6:8.2f} MB   "
        f"{size.ratio:.2f}x smaller",
        f"cosine    {fidelity.cosine:.5f}   SQNR {fidelity.sqnr_db:.1f} dB   (int8 vs fp32 hidden states)",
    ]
    for row in metrics.latency:
        lines.append(
            f"latency   batch {row.batch_size:<3} fp32 {row.fp32_ms.p50:8.3f} ms   "
            f"int8 {row.int8_ms.p50:8.3f} ms   {row.speedup or 0:.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="default: $QAAS_SERVER, else http://127.0.0.1:8000")
    parser.add_argument("--key", help="API key (default: $QAAS_API_KEY)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="encoder layers (default 4)")
    parser.add_argument("--iterations", type=int, default=50, help="benchmark iterations per batch size")
    parser.add_argument("--backend", choices=("fbgemm", "x86", "auto"), default="fbgemm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="qaas-bert-") as scratch:
        folder = build_model_folder(Path(scratch) / "bert", args.hidden, args.layers, args.seed)
        archive = zip_folder(folder, Path(scratch) / "bert.zip")
        sentences = Path(scratch) / "sentences.jsonl"
        sentences.write_text("".join(json.dumps({"text": text}) + "\n" for text in SENTENCES))
        with Client(args.server, api_key=args.key, timeout=120) as client:
            model = client.wait_model(client.upload_model(archive, name="bert-random"))
            text = client.wait_dataset(client.upload_dataset(sentences))
            for upload in (model, text):
                if upload.status != "ready":
                    raise SystemExit(f"{upload.name} is {upload.status}: {upload.error}")
            print(
                f"uploaded {archive.name}: {model.format}, {model.inspection and model.inspection.get('hf')}"
            )
            job = client.submit(
                model,
                mode="dynamic",
                backend=args.backend,
                eval_dataset_id=text,
                options={"quantize_embeddings": True},
                benchmark={"batch_sizes": [1, 8], "iterations": args.iterations},
            )
            job = client.wait(job, timeout=600)
    print(summary(job))
    return 0 if job.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
