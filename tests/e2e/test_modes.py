"""One job per format and per mode through the HTTP API with a real worker (the engine tests cover every
cell of the support matrix; these prove the service carries each kind of job end to end)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.e2e.conftest import Stack
from tests.engine.conftest_static import Digits, SmallCNN
from tests.engine.test_hf import build_hf_folder, zip_folder

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.parametrize("stack", ["embedded"], indirect=True),
]
pytest_plugins = ["tests.engine.conftest_static"]
FBGEMM = {"backend": "fbgemm", "benchmark": {"batch_sizes": [1], "iterations": 5}}
DONE = {"succeeded", "failed", "cancelled"}


def _upload(stack: Stack, kind: str, path: Path, **fields: str) -> dict[str, Any]:
    with open(path, "rb") as handle:
        response = stack.client.post(f"/v1/{kind}", files={"file": (path.name, handle)}, data=fields)
    assert response.status_code == 201, response.text
    ready = stack.wait(f"/v1/{kind}/{response.json()['id']}", {"ready", "invalid"})
    assert ready["status"] == "ready", ready
    return ready


def _job(stack: Stack, **body: Any) -> dict[str, Any]:
    response = stack.client.post("/v1/jobs", json=FBGEMM | body)
    assert response.status_code == 202, response.text
    job = stack.wait(f"/v1/jobs/{response.json()['id']}", DONE, timeout_s=300)
    assert job["status"] == "succeeded", job
    return job


def test_static_and_qat_keep_digits_accuracy(stack: Stack, digits: Digits, tmp_path: Path) -> None:
    model = _upload(stack, "models", digits.pt2)
    train = _upload(stack, "datasets", digits.train)
    test = _upload(stack, "datasets", digits.test)
    assert (train["has_labels"], train["tensors"]["x"]["shape"][1:]) == (True, [1, 8, 8])

    static = _job(
        stack,
        model_id=model["id"],
        mode="static",
        calibration_dataset_id=train["id"],
        eval_dataset_id=test["id"],
    )
    qat = _job(
        stack,
        model_id=model["id"],
        mode="qat",
        train_dataset_id=train["id"],
        eval_dataset_id=test["id"],
        options={"qat": {"epochs": 1, "learning_rate": 1e-3}},
    )
    for job in (static, qat):
        accuracy = job["metrics"]["accuracy"]
        assert accuracy["fp32"] == pytest.approx(digits.accuracy, abs=0.01)
        assert abs(accuracy["delta"]) <= 1.0, accuracy
        assert job["metrics"]["size"]["ratio"] > 2.5
        assert job["manifest"]["mode"] == job["mode"]
    assert static["manifest"]["calibration_samples"] > 0
    # The same static job on x86: an AOTInductor package (the grayscale input conv stays float, as noted).
    x86 = _job(
        stack,
        model_id=model["id"],
        mode="static",
        backend="x86",
        calibration_dataset_id=train["id"],
        eval_dataset_id=test["id"],
    )
    assert x86["backend"]["chosen"] == "x86" and abs(x86["metrics"]["accuracy"]["delta"]) <= 1.0
    assert any("1 input channel" in w for w in x86["metrics"]["warnings"])
    # The accuracy in each report is what the downloaded file gives, loaded the way its snippet says.
    for job in (static, qat, x86):
        assert _downloaded_accuracy(stack, job, digits, tmp_path) == pytest.approx(
            job["metrics"]["accuracy"]["int8"], abs=0.5
        )

    missing = stack.client.post(
        "/v1/jobs", json={"model_id": model["id"], "mode": "qat", "train_dataset_id": test["id"]} | FBGEMM
    )
    assert missing.status_code == 202  # test split has labels too: accepted
    no_labels = stack.client.post("/v1/jobs", json={"model_id": model["id"], "mode": "static"} | FBGEMM)
    assert no_labels.status_code == 422 and no_labels.json()["error"] == "dataset_required"


def _downloaded_accuracy(stack: Stack, job: dict[str, Any], digits: Digits, tmp_path: Path) -> float:
    [artifact] = [a for a in job["artifacts"] if a["name"].startswith("model.int8")]
    path = tmp_path / f"{job['id']}-{artifact['name']}"
    path.write_bytes(stack.client.get(artifact["url"]).content)
    if path.name.endswith(".aoti.pt2"):
        import os

        os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
        model = torch._inductor.aoti_load_package(str(path))
    else:
        torch.backends.quantized.engine = job["metrics"]["environment"]["engine"]
        model = torch.jit.load(str(path))
    data = np.load(digits.test)
    x, labels = torch.from_numpy(data["x"]), torch.from_numpy(data["labels"])
    with torch.no_grad():
        scores = torch.cat([model(x[i : i + 64]) for i in range(0, len(x), 64)])
    return 100.0 * float((scores.argmax(1) == labels).float().mean())


def test_torchscript_static_with_an_image_folder_calibration_set(stack: Stack, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cnn = SmallCNN(channels=3, size=16).eval()
    path = tmp_path / "cnn.ts"
    torch.jit.save(torch.jit.script(cnn), path)
    model = _upload(stack, "models", path, input_shapes='{"x": [null, 3, 16, 16]}')

    images = tmp_path / "images.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(images, "w") as zf:
        for label in ("cat", "dog"):
            for index in range(20):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(buffer, "PNG")
                zf.writestr(f"{label}/{index}.png", buffer.getvalue())
    spec = {"resize": 16, "crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    calib = _upload(stack, "datasets", images, preprocess=json.dumps(spec))
    assert calib["format"] == "image_folder" and calib["classes"] == ["cat", "dog"]
    assert calib["tensors"]["x"]["shape"] == [40, 3, 16, 16] and calib["preprocess"] == spec

    # The x86 backend asked for by name (fbgemm carries the other TorchScript jobs): torch.ao's x86 engine.
    job = _job(stack, model_id=model["id"], mode="static", backend="x86", calibration_dataset_id=calib["id"])
    assert job["backend"] == {"requested": "x86", "chosen": "x86"}
    assert job["metrics"]["environment"]["engine"] == "x86"
    assert 'torch.backends.quantized.engine = "x86"' in job["load_snippet"]
    assert job["metrics"]["layers"]["quantized"] >= 2
    assert job["metrics"]["fidelity"]["cosine"] >= 0.98
    assert job["metrics"]["verification"]["fresh_process"] is True


def test_hugging_face_dynamic_with_a_jsonl_eval_set(stack: Stack, tmp_path: Path) -> None:
    archive = zip_folder(build_hf_folder(tmp_path / "bert"), tmp_path / "bert.zip")
    model = _upload(stack, "models", archive)
    assert model["format"] == "hf" and model["inspection"]["hf"]["tokenizer"] is True
    assert [i["name"] for i in model["inspection"]["inputs"]] == ["input_ids", "attention_mask"]
    lines = [{"text": "the cat sat on a mat", "label": 0}, {"text": "a dog sat", "label": 1}] * 4
    text = tmp_path / "eval.jsonl"
    text.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = _upload(stack, "datasets", text)
    assert dataset["format"] == "jsonl" and dataset["num_samples"] == 8

    job = _job(stack, model_id=model["id"], mode="dynamic", eval_dataset_id=dataset["id"])
    assert job["metrics"]["fidelity"]["cosine"] >= 0.99
    artifact = next(a for a in job["artifacts"] if a["name"] == "model.int8.ts")
    path = tmp_path / "bert.int8.ts"
    path.write_bytes(stack.client.get(artifact["url"]).content)
    traced = torch.jit.load(str(path))
    ids = torch.randint(5, 100, (2, 7))
    assert traced(ids, torch.ones_like(ids)).shape[:2] == (2, 7)

    refused = stack.client.post(
        "/v1/jobs", json={"model_id": model["id"], "mode": "static", "calibration_dataset_id": dataset["id"]}
    )
    assert refused.status_code == 422 and refused.json()["error"] == "unsupported_combination"


def test_auto_measures_both_backends_and_ships_the_winner(stack: Stack, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cnn = SmallCNN(channels=3, size=16).eval()
    pt2 = tmp_path / "cnn.pt2"
    program = torch.export.export(
        cnn, (torch.randn(2, 3, 16, 16),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(program, pt2)
    calib_path = tmp_path / "calib.npz"
    np.savez(calib_path, x=np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32))
    model = _upload(stack, "models", pt2)
    calib = _upload(stack, "datasets", calib_path)
    job = _job(
        stack,
        model_id=model["id"],
        mode="static",
        backend="auto",
        calibration_dataset_id=calib["id"],
        options={"calibration_batches": 4, "activation_observer": "minmax"},
    )
    backends = job["metrics"]["backends"]
    assert set(backends) == {"fbgemm", "x86"}, backends
    assert not [entry for entry in backends.values() if "error" in entry], backends
    assert all(entry["int8_ms_p50"] > 0 for entry in backends.values()), backends
    chosen = job["backend"]["chosen"]
    assert chosen in backends and job["metrics"]["backend_choice"]
    models = [a for a in job["artifacts"] if a["name"].startswith("model.int8")]
    assert len(models) == 1, job["artifacts"]  # only the winner is published
    artifact = models[0]
    path = tmp_path / artifact["name"]
    path.write_bytes(stack.client.get(artifact["url"]).content)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    if artifact["name"].endswith(".aoti.pt2"):
        import os

        os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
        loaded = torch._inductor.aoti_load_package(str(path))
    else:
        torch.backends.quantized.engine = job["metrics"]["environment"]["engine"]
        loaded = torch.jit.load(str(path))
    with torch.no_grad():
        got, expected = loaded(x), cnn(x)
    assert got.shape == expected.shape == (3, 10)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) >= 0.98
