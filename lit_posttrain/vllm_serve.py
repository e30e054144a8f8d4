"""``lit-posttrain vllm-serve``: a vLLM generation server whose weights the trainer updates.

    lit-posttrain vllm-serve --model PATH [--random-init] --host 127.0.0.1 --port 8000

The training side is `lit_posttrain.callbacks.VLLMRollout(mode="server", server_host=...,
server_port=...)`, whose engine, `lit_posttrain.rollout.VLLMServerRollout`, is this server's
client. Every training rank posts its own prompts; global rank 0 pushes new weights after
optimizer steps. ``--random-init`` starts from a directory without weights (config and
tokenizer only): the trainer pushes its weights before the first generation.

Multi-node layout: run this command on the inference node(s) (``--host 0.0.0.0``, and
``--tensor-parallel-size N`` for the GPUs of one node), the training job on the other nodes with
``server_host`` set to the inference node. Weights travel over HTTP as safetensors chunks: fine
on a fast network for small and mid-sized models; the server is single-threaded, so requests from
several ranks are served one after another (one engine, continuous batching inside each request).

HTTP endpoints (JSON answers):
- ``GET /health``: ``{"status": "ok", "num_weight_updates": n}``
- ``POST /generate``: JSON ``{"prompt_ids", "num_generations", "max_completion_length",
  "temperature", "top_p", "top_k", "stop_token_ids", "seed" (optional: prompt i samples with
  seed + i, so a request's completions do not depend on what the server served before)}`` ->
  ``{"completion_ids", "logps"}`` (prompt-major; log-probs of the sampled tokens after
  temperature / top-k / top-p)
- ``POST /update_weights/begin``, ``/update_weights/chunk`` (body: safetensors bytes with
  checkpoint names), ``/update_weights/end``: one in-place reload streamed layer by layer
- ``POST /update_adapter`` (body: ``adapter_model.safetensors`` bytes, header
  ``X-Adapter-Config``: the adapter config JSON): use this LoRA adapter from now on (needs
  ``--max-lora-rank``)
- ``POST /shutdown``: answer, stop serving and exit with code 0 (SIGTERM does the same)

Security: every ``POST`` (generation, weight and adapter updates, shutdown) needs the header
``Authorization: Bearer <token>`` when a token is set: ``LIT_POSTTRAIN_SERVE_TOKEN`` in the
environment or ``--token-file`` (the trainer sends ``LIT_POSTTRAIN_SERVE_TOKEN``; give both sides the
same). Without a token the server only binds a loopback address: ``--host 0.0.0.0`` without one is
refused. Requests are served on their own threads, engine work one request at a time; a body that
does not arrive within ``--request-timeout`` seconds is dropped, one larger than
``--max-body-bytes`` is refused (413), so one slow or hostile client cannot stall the others.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import itertools
import json
import os
import queue
import shutil
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import safetensors.torch

from lit_posttrain.rollout import vllm_engine
from lit_posttrain.rollout.base import process_tmpdir


class _WeightStream:
    """One ``reload_weights`` call in a background thread, fed chunk by chunk over HTTP."""

    def __init__(self, llm):
        self.chunks: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(llm,), daemon=True)
        self.thread.start()

    def _run(self, llm) -> None:
        try:
            vllm_engine.load_weights(llm, self._weights())
        except BaseException as err:  # reported to the client at /update_weights/end
            self.error = err
            while self.chunks.get() is not None:  # drain, so the HTTP side never blocks
                pass

    def _weights(self):
        while (chunk := self.chunks.get()) is not None:
            yield from chunk.items()

    def finish(self) -> None:
        self.chunks.put(None)
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"weight update failed: {self.error!r}") from self.error


TOKEN_ENV = "LIT_POSTTRAIN_SERVE_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: treat as reachable from outside
        return False


class VLLMServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, llm, *, token: str | None = None, request_timeout: float = 60.0,
                 max_body_bytes: int = 2**31):
        super().__init__(address, _Handler)
        self.llm = llm
        self.token, self.request_timeout, self.max_body_bytes = token, request_timeout, max_body_bytes
        self.engine_lock = threading.Lock()  # engine work one request at a time, as the engine wants
        self.stream: _WeightStream | None = None
        self.num_weight_updates = 0
        self.lora_request = None
        self.lora_ids = itertools.count(1)  # vLLM caches adapters by id: ids never repeat
        self.adapter_dir = process_tmpdir("lit-posttrain-serve-adapter-")  # (and removes dead servers' dirs)

    def generate(self, request: dict) -> dict:
        completion_ids, logps = vllm_engine.generate(
            self.llm,
            request["prompt_ids"],
            num_generations=request["num_generations"],
            max_completion_length=request["max_completion_length"],
            temperature=request["temperature"],
            top_p=request["top_p"],
            top_k=request["top_k"],
            stop_token_ids=request["stop_token_ids"],
            lora_request=self.lora_request,
            seed=request.get("seed"),
        )
        return {"completion_ids": completion_ids, "logps": logps}

    def update_adapter(self, weights: bytes, config: dict) -> dict:
        from vllm.lora.request import LoRARequest  # optional dependency: vLLM

        lora_id = next(self.lora_ids)
        path = self.adapter_dir / f"v{lora_id}"
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(weights)
        (path / "adapter_config.json").write_text(json.dumps(config))
        self.drop_adapter()
        self.lora_request = LoRARequest(f"policy-v{lora_id}", lora_id, str(path))
        self.llm.reset_prefix_cache()
        return {"status": "ok", "lora_id": lora_id}

    def drop_adapter(self) -> None:
        if self.lora_request is not None:
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            shutil.rmtree(self.lora_request.lora_path, ignore_errors=True)
            self.lora_request = None


class _Handler(BaseHTTPRequestHandler):
    server: VLLMServer

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # socket timeout for reading this request
        super().setup()

    def do_GET(self):
        if self.path == "/health":
            self._answer({"status": "ok", "num_weight_updates": self.server.num_weight_updates})
        else:
            self._answer({"error": f"unknown path {self.path}"}, status=404)

    def do_POST(self):
        server = self.server
        if server.token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                self.close_connection = True  # the body was not read
                return self._answer({"error": f"unauthorized: send 'Authorization: Bearer <{TOKEN_ENV}>'"}, status=401)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._answer({"error": "bad Content-Length"}, status=400)
        if not 0 <= length <= server.max_body_bytes:
            self.close_connection = True
            return self._answer({"error": f"body of {length} bytes; the limit is {server.max_body_bytes}"}, status=413)
        try:
            body = self.rfile.read(length)
        except TimeoutError:  # a client that stopped sending: drop it, the others are unaffected
            self.close_connection = True
            return
        if len(body) < length:
            self.close_connection = True
            return self._answer({"error": "incomplete body"}, status=400)
        with server.engine_lock:
            self._post(body)

    def _post(self, body: bytes) -> None:
        server = self.server
        try:
            if self.path == "/generate":
                self._answer(server.generate(json.loads(body)))
            elif self.path == "/update_weights/begin":
                server.drop_adapter()  # these weights are the whole policy (an adapter follows if any)
                server.stream = _WeightStream(server.llm)
                self._answer({"status": "ok"})
            elif self.path == "/update_weights/chunk":
                server.stream.chunks.put(safetensors.torch.load(body))
                self._answer({"status": "ok"})
            elif self.path == "/update_weights/end":
                start = time.perf_counter()
                stream, server.stream = server.stream, None
                stream.finish()
                server.num_weight_updates += 1
                self._answer({"status": "ok", "seconds": time.perf_counter() - start})
            elif self.path == "/update_adapter":
                self._answer(server.update_adapter(body, json.loads(self.headers["X-Adapter-Config"])))
            elif self.path == "/shutdown":
                self._answer({"status": "shutting down"})
                threading.Thread(target=server.shutdown, daemon=True).start()
            else:
                self._answer({"error": f"unknown path {self.path}"}, status=404)
        except Exception as err:  # the client sees the error instead of a dropped connection
            self._answer({"error": repr(err)}, status=500)
            raise

    def _answer(self, payload: dict, status: int = 200) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # one line per request is noise at one request per step
        pass


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lit-posttrain vllm-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory or hub id")
    parser.add_argument(
        "--random-init", action="store_true", help="no weights on disk: wait for the trainer's"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument(
        "--kv-cache-memory-bytes", type=int, default=None, help="KV-cache size (prefer it on CPU)"
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument(
        "--max-lora-rank", type=int, default=None, help="enable LoRA adapters up to this rank"
    )
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--token-file", default=None,
        help=f"file holding the shared secret every POST must carry (default: ${TOKEN_ENV}); required "
        "to bind a non-loopback address",
    )
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds to receive a request")
    parser.add_argument("--max-body-bytes", type=int, default=2**31, help="largest request body accepted")
    return parser.parse_args(argv)


def read_token(token_file: str | None) -> str | None:
    token = Path(token_file).read_text().strip() if token_file else os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def main(argv=None) -> None:
    args = parse_args(argv)
    token = read_token(args.token_file)
    if token is None and not is_loopback(args.host):
        raise SystemExit(
            f"lit-posttrain vllm-serve: refusing to listen on {args.host} without a token: anyone who reaches the "
            f"port could replace the weights or stop the server. Set {TOKEN_ENV} (or --token-file) here and "
            f"{TOKEN_ENV} in the training job's environment."
        )
    llm = vllm_engine.create_engine(
        args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager,
        max_lora_rank=args.max_lora_rank,
        seed=args.seed,
        load_format="dummy" if args.random_init else "auto",
    )
    server = VLLMServer(
        (args.host, args.port), llm, token=token, request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
    )
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"lit-posttrain vllm-serve: listening on http://{args.host}:{args.port} "
          f"({'token required' if token else 'loopback only, no token'})", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        shutil.rmtree(server.adapter_dir, ignore_errors=True)
        llm.llm_engine.engine_core.shutdown()
    print("lit-posttrain vllm-serve: stopped", flush=True)


if __name__ == "__main__":
    main()
