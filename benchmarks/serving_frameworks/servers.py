"""A trivial V2 inference endpoint on each candidate framework (docs/serving.md, "Why Starlette").

python servers.py MODE PORT   MODE: stdlib | starlette | fastapi | fastapi-std | litserve | kserve

POST /v2/models/m/infer with {"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["..."]}]}:
parse, hand the texts to a batcher thread, as the real server does (no model: it answers at once),
answer V2 JSON. So the figures are the framework's cost around the model: parsing, the hand-over
between threads, the response. run.sh installs each framework in a scratch venv and measures it.
"""

import json
import queue
import sys
import threading
from concurrent.futures import Future

MODE, PORT = sys.argv[1], int(sys.argv[2])


def answer(body: bytes) -> dict:
    req = json.loads(body)
    texts = req["inputs"][0]["data"]
    return texts


class Batcher:
    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while True:
            items = [self.q.get()]
            while True:
                try:
                    items.append(self.q.get_nowait())
                except queue.Empty:
                    break
            for texts, done in items:
                done(
                    {
                        "model_name": "m",
                        "model_version": "1",
                        "outputs": [
                            {"name": "label", "datatype": "BYTES", "shape": [len(texts)], "data": ["pos"] * len(texts)},
                            {"name": "probabilities", "datatype": "FP32", "shape": [len(texts), 2], "data": [0.5, 0.5] * len(texts)},
                        ],
                    }
                )


batcher = Batcher()

if MODE == "stdlib":
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK = 40 ms

        def do_POST(self):
            n = int(self.headers.get("Content-Length", 0))
            texts = answer(self.rfile.read(n))
            f: Future = Future()
            batcher.q.put((texts, f.set_result))
            body = json.dumps(f.result()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", PORT), H).serve_forever()

elif MODE in ("starlette", "fastapi", "fastapi-std"):
    import asyncio

    import uvicorn

    async def handoff(texts):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        batcher.q.put((texts, lambda r: loop.call_soon_threadsafe(fut.set_result, r)))
        return await fut

    if MODE == "starlette":
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def infer(request):
            texts = answer(await request.body())
            return JSONResponse(await handoff(texts))

        app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])
    else:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse

        app = FastAPI()

        @app.post("/v2/models/{name}/infer")
        async def infer(name: str, request: Request):
            texts = answer(await request.body())
            return JSONResponse(await handoff(texts))

    uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning",  # noqa
                **({"http": "h11", "loop": "asyncio"} if MODE != "fastapi-std" else {}))

elif MODE == "litserve":
    import litserve as ls

    class API(ls.LitAPI):
        def setup(self, device):
            pass

        def decode_request(self, request):
            return request["inputs"][0]["data"]

        def predict(self, texts):
            f: Future = Future()
            batcher.q.put((texts, f.set_result))
            return f.result()

        def encode_response(self, output):
            return output

    if __name__ == "__main__":
        server = ls.LitServer(API(api_path="/v2/models/m/infer"), accelerator="cpu", workers_per_device=1)
        server.run(port=PORT, generate_client_file=False)

elif MODE == "kserve":
    import asyncio

    import kserve
    from kserve import InferResponse, InferOutput

    class M(kserve.Model):
        def __init__(self):
            super().__init__("m")
            self.ready = True

        async def predict(self, payload, headers=None, response_headers=None):
            texts = payload.inputs[0].data
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            batcher.q.put((texts, lambda r: loop.call_soon_threadsafe(fut.set_result, r)))
            r = await fut
            outs = [InferOutput(name=o["name"], shape=o["shape"], datatype=o["datatype"], data=o["data"]) for o in r["outputs"]]
            return InferResponse(model_name="m", infer_outputs=outs, response_id="r")

    kserve.ModelServer(http_port=PORT, grpc_port=PORT + 1, enable_grpc=False).start([M()])
