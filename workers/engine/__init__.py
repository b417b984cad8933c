"""qaas quantization engine: a pure library (torch, numpy, safetensors, stdlib and the job contract).

    from qaas.contract.jobs import DynamicConfig
    from workers.engine.api import quantize
    result = quantize("model.pt2", DynamicConfig(), out_dir="out")

The configs are the job contract's (`qaas.contract.jobs`); the support matrix and the dataset shape rule are
the contract's too (`qaas.contract.support`, `qaas.contract.shapes`): the API shares them with the engine.
"""
