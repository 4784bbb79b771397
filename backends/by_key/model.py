"""A Python-based Triton backend named ``by_key``: a model that takes entity keys, reads their
features from the feature store itself, and has another model score them.

The seed's second way of getting the input: each inference server fetches the data it needs,
instead of the proxy collecting it once for all of them (``client_proxy.core.features``). A
model whose config says ``backend: "by_key"`` takes one ``TYPE_STRING`` input of keys
(``[N, 1]``), reads the keys' vectors from the store named by Triton's ``FEATURE_STORE``
environment variable (the proxy's ``PROXY_FEATURE_STORE`` URL: SQLite, Redis or PostgreSQL),
in one batched lookup per execution (a dynamic batch's keys together), and sends the rows to
the model that scores them as one BLS request, whose output it returns as its own.

The reading is the proxy's own code (``client_proxy.stores`` and ``fetch_rows``), run on an
event loop of this model's, so both variants read the same store in the same way. So the
project must be importable by the Python stub (the embedded server puts it on ``PYTHONPATH``),
on Python 3.11 or later.

Parameters (``parameters`` in the model's config, all strings):

- ``feature_set``: the feature set the keys are in (``iris``);
- ``model``: the model that scores the rows (``setosa``), on the same server;
- ``model_input``: its input's name (default ``input``), ``model_input_datatype`` its type
  (default ``FP32``);
- ``model_output``: its output's name (default: this model's own output's name);
- ``store_timeout_ms``: the longest a lookup may take when the request sets no timeout
  (default 1000); ``store_pool``: connections to the store (default ``FEATURE_STORE_POOL``, else 2);
- ``model_timeout_ms``: the longest the scoring model's answer is waited for (default 1000), or
  less when the requests set a timeout: then the requests fail with ``INTERNAL`` naming the model,
  and this instance takes the next batch (the late call is left to finish; its answer is
  dropped). A Triton request timeout bounds only its time in a queue, not a model that is slow.

A key the store does not hold fails the requests that name it with ``INVALID_ARG``, naming the
keys; a store that cannot be read (or not within the time) fails the batch with ``INTERNAL``,
naming the store.

This file runs inside Triton's Python stub; ``triton_python_backend_utils`` exists only there.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

_DTYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}


def _parameter(config: dict[str, Any], key: str, default: str = "") -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", "") or default)


def _error(message: str, code: str) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        # The proxy's store code; imported here so that a model without the project on its path
        # fails to load with this message rather than the stub's traceback.
        try:
            from client_proxy.core.features import fetch_rows
            from client_proxy.core.services import TimeoutPolicy
            from client_proxy.errors import UnknownKeys
            from client_proxy.stores import check_url, open_store
        except ImportError as exc:
            raise pb_utils.TritonModelException(
                f"backend by_key needs the project's client_proxy package on PYTHONPATH ({exc})"
            ) from None

        config = json.loads(args["model_config"])
        self.name = config.get("name", args.get("model_name", "?"))
        inputs, outputs = config.get("input", []), config.get("output", [])
        if len(inputs) != 1 or inputs[0].get("data_type") != "TYPE_STRING" or len(outputs) != 1:
            raise pb_utils.TritonModelException(
                f"{self.name}: a by_key model takes one TYPE_STRING input (the keys) and gives one output"
            )
        self.input = inputs[0]["name"]
        self.output = outputs[0]["name"]
        self.feature_set = _parameter(config, "feature_set")
        self.scorer = _parameter(config, "model")
        if not self.feature_set or not self.scorer:
            raise pb_utils.TritonModelException(f"{self.name}: parameters feature_set and model are required")
        self.scorer_input = _parameter(config, "model_input", "input")
        self.scorer_output = _parameter(config, "model_output", self.output)
        datatype = _parameter(config, "model_input_datatype", "FP32")
        if datatype not in _DTYPES:
            raise pb_utils.TritonModelException(
                f"{self.name}: model_input_datatype must be one of {sorted(_DTYPES)}"
            )
        self.dtype = _DTYPES[datatype]
        try:
            self.timeout_s = int(_parameter(config, "store_timeout_ms", "1000")) / 1000
            self.model_timeout_s = int(_parameter(config, "model_timeout_ms", "1000")) / 1000
            pool = int(_parameter(config, "store_pool", os.environ.get("FEATURE_STORE_POOL", "2")))
        except ValueError:
            raise pb_utils.TritonModelException(
                f"{self.name}: store_timeout_ms, model_timeout_ms and store_pool are integers"
            ) from None
        url = os.environ.get("FEATURE_STORE", "")
        try:
            check_url(url)
        except ValueError as exc:
            raise pb_utils.TritonModelException(
                f"{self.name}: set FEATURE_STORE in Triton's environment to the feature store's URL: {exc}"
            ) from None
        self._fetch_rows = fetch_rows
        self._policy = TimeoutPolicy.PARTIAL
        self._unknown = UnknownKeys
        self.store = open_store(url, max(pool, 1))
        # The store's clients are asyncio's; execute() is not, so they run on a loop of their own.
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"{self.name}-store", daemon=True)
        self.thread.start()
        # The scoring model's calls, waited for with a bound (a late one keeps its thread until it
        # ends: a few threads, so that late calls do not hold up the next batch's).
        self.calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"{self.name}-bls")

    def execute(self, requests: list[Any]) -> list[Any]:
        keys_per_request = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self.input)
            array = tensor.as_numpy() if tensor is not None else np.empty((0,), dtype=object)
            keys_per_request.append([k.decode() if isinstance(k, bytes) else str(k) for k in array.ravel()])
        every = [k for keys in keys_per_request for k in keys]
        timeouts = [r.timeout() / 1e6 for r in requests if r.timeout()]
        started = time.monotonic()
        deadline = started + min([self.timeout_s, *timeouts])
        model_deadline = started + min([self.model_timeout_s, *timeouts])
        fetch = self._fetch_rows(self.store, self.feature_set, every, deadline, self._policy)
        try:
            fetched = asyncio.run_coroutine_threadsafe(fetch, self.loop).result()
        except Exception as exc:  # every failure of the lookup fails the batch, named
            message = f"{self.name}: {getattr(exc, 'message', None) or exc}"
            # INTERNAL, not UNAVAILABLE: the server answers, its store does not (clients take
            # UNAVAILABLE for the server itself gone).
            code = "INVALID_ARG" if isinstance(exc, self._unknown) else "INTERNAL"
            return [_error(message, code) for _ in requests]
        rows_of = dict(zip(fetched.keys, fetched.rows, strict=True))
        missing = set(fetched.missing)

        responses: list[Any] = [None] * len(requests)
        good, parts = [], []
        for index, keys in enumerate(keys_per_request):
            unknown = [k for k in dict.fromkeys(keys) if k in missing]
            if unknown:
                named = ", ".join(repr(k) for k in unknown[:10])
                more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
                responses[index] = _error(
                    f"{self.name}: feature set {self.feature_set!r} does not hold {named}{more}",
                    "INVALID_ARG",
                )
            else:
                good.append(index)
                parts.append(np.asarray([rows_of[k] for k in keys], dtype=self.dtype))
        if not good:
            return responses

        rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        call = pb_utils.InferenceRequest(
            model_name=self.scorer,
            requested_output_names=[self.scorer_output],
            inputs=[pb_utils.Tensor(self.scorer_input, rows)],
        )
        try:
            scored = self.calls.submit(call.exec).result(
                timeout=max(model_deadline - time.monotonic(), 0.001)
            )
        except FutureTimeout:
            waited = (time.monotonic() - started) * 1000
            message = f"{self.name}: model {self.scorer!r} did not answer within {waited:.0f} ms"
            for index in good:
                responses[index] = _error(message, "INTERNAL")
            return responses
        if scored.has_error():
            message = f"{self.name}: model {self.scorer!r} failed: {scored.error().message()}"
            for index in good:
                responses[index] = _error(message, "INTERNAL")
            return responses
        result = pb_utils.get_output_tensor_by_name(scored, self.scorer_output).as_numpy()
        offset = 0
        for index, part in zip(good, parts, strict=True):
            piece = result[offset : offset + len(part)]
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self.output, piece)]
            )
            offset += len(part)
        return responses

    def finalize(self) -> None:
        self.calls.shutdown(wait=False, cancel_futures=True)
        try:
            asyncio.run_coroutine_threadsafe(self.store.aclose(), self.loop).result(timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
