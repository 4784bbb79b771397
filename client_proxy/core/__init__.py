"""The transport-free core: services, tensor contracts, the fan-out with its deadline, the
aggregators, compositions and pipelines. Nothing here imports FastAPI, Starlette or tritonclient:
it takes typed inputs and returns typed results, and calls models through the ``Gateway`` protocol."""
