"""Framework adapters, installed as ``lossledger.adapters``: each turns framework tensors into ``Run.log`` calls."""
