"""What the engine is given: uploaded models (`.pt2`, TorchScript, Hugging Face folders), their archives, and
datasets (arrays, image folders, JSONL text). Below everything else in the engine: it knows no job or backend."""
