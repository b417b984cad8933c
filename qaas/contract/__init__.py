"""What the client, the API, the worker and the engine share: stdlib and pydantic only, never a server or torch
(the vocabularies, the job contract, the support matrix, the shape rule, the archive checks, the CLI flags)."""
