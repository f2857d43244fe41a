"""``flare-serve``: the whole torch-free pipeline as model ``flare`` on NVIDIA Triton Inference Server (PyTriton).

PyTriton starts a real ``tritonserver``; Triton's Python backend runs a proxy model in its
``triton_python_backend_stub`` process, which forwards each request to :class:`FlareModel` in this process (one
:class:`~flare.runtime.pipeline.segmenter.Segmenter` per model instance, its models loaded once). The wire protocol is
:mod:`flare.runtime.serving.protocol`.

The stub links ``libpython3.X.so.1.0`` and the dynamic loader finds the first one on its search path: a system
libpython of another patch release (Debian's 3.11.2 under pyenv's 3.11.7 fails with ``'_thread.RLock' object has no
attribute '_recursion_count'``), or none at all (pyenv's 3.12). :func:`python_backend_env` puts this interpreter's own
``LIBDIR`` first on ``LD_LIBRARY_PATH`` of the server process and :func:`stub_libpython` checks with ``ldd`` which
library the stub will load, before the server starts. pytriton is imported lazily.

Triton listens on loopback ports of its own; the ports a client talks to are the bounded fronts of
:mod:`flare.runtime.serving.front` (a request over ``FLARE_MAX_REQUEST_BYTES`` is refused there, unbuffered).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from flare.runtime.foundation.errors import FlareError, InputError
from flare.runtime.foundation.lazy import lazy_import
from flare.runtime.inference.engine_names import CpuEngine
from flare.runtime.serving.front import return_memory
from flare.runtime.serving.protocol import ERROR_MARKER, INPUT, MODEL, OUTPUT_LABELS, OUTPUT_REPORT, request_name

__all__ = ["FlareModel", "instance_devices", "load_models", "parse_devices", "python_backend_env", "serve",
           "stub_libpython"]

log = logging.getLogger("flare.runtime")

EXIT_TIMEOUT_S = 20
"""Triton waits this long for in-flight requests on SIGTERM/SIGINT (the whole stop stays under 30 s)."""
STOP_DEADLINE_S = 27
"""After SIGTERM/SIGINT the process ends by this time even when a request is still computing."""
START_ATTEMPTS = 3
"""Starts of Triton when the model fails to load (PyTriton's instance handshake times out on a busy machine)."""


MAX_REQUEST_BYTES = 512 * 2**20
"""Default of ``FLARE_MAX_REQUEST_BYTES``: a request body (HTTP) or message (gRPC) larger than this is refused by the
front port before it is buffered (:mod:`flare.runtime.serving.front`), an image larger than this before it is
parsed. 512M takes a 512x512x1000 int16 CT (an estimated 340-380 MB as .nii.gz); junk of any size is refused from its
first bytes by :mod:`flare.runtime.serving.gate`, so the limit bounds what a well-formed request may cost."""
ENV_REQUEST_BYTES = "FLARE_MAX_REQUEST_BYTES"
METRICS_MAX_BODY = 2**16
"""The metrics port serves ``GET /metrics``: a larger request body is refused."""
READY_WAIT_S = 300.0
"""How long flare-serve waits for model ``flare`` to answer ready before it reports failure."""


class RequestError(Exception):
    """Fails one request with ONE line, ``flare-error: <file>: <problem>``, whatever the client.

    PyTriton sends a failed request's error as ``traceback.format_exception(None, err, err.__traceback__)`` (the
    stack, with this server's file paths and line numbers, and ``module.Class: message``). This class reports no
    traceback and formats as ``flare-error: message``, so that the text is exactly the one line."""

    def __init__(self, line: str) -> None:
        super().__init__(" ".join(str(line).split()))

    @property  # type: ignore[override]
    def __traceback__(self) -> None:  # what traceback.format_exception reads: no stack
        return None

    @__traceback__.setter
    def __traceback__(self, value: object) -> None:
        pass


# formats as "flare-error: <message>" (traceback prints "<qualname>: <message>" for builtins)
RequestError.__module__ = "builtins"
RequestError.__qualname__ = ERROR_MARKER.rstrip(": ")


# ------------------------------------------------------------------------------------------------ libpython
def libpython_path() -> Path:
    """This interpreter's shared libpython (``LIBDIR/INSTSONAME``); FlareError when it was built without one."""
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    path = Path(libdir or "") / (soname or "")
    if not (libdir and soname and path.is_file() and ".so" in path.name):
        raise FlareError(None, f"this Python ({sys.executable}) has no shared libpython (built without "
                               "--enable-shared); Triton's Python backend needs one: use a Python built with "
                               "--enable-shared, e.g. pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared")
    return path


def python_backend_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH`` (for the server process)."""
    libdir = str(libpython_path().parent)
    rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    return {**env, "LD_LIBRARY_PATH": os.pathsep.join([libdir, *rest])}


def stub_libpython(env: Mapping[str, str]) -> Path | None:
    """The libpython that PyTriton's Python-backend stub for this interpreter loads under ``env`` (``ldd``), or
    None when that cannot be told (no ``ldd``, no stub)."""
    from pytriton.utils.distribution import get_stub_path

    stub = get_stub_path(f"{sys.version_info.major}.{sys.version_info.minor}")
    try:
        out = subprocess.run(["ldd", str(stub)], env=dict(env), capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        name, _, where = line.strip().partition(" => ")
        if name.startswith("libpython") and where:
            found = where.split(" (")[0].strip()
            return Path(found) if found.startswith("/") else None  # "not found"
    return None


def prepare_server_environment() -> None:
    """Make the server process (started by PyTriton from ``os.environ``) load this interpreter's libpython, and
    check it; FlareError when the stub would still load another one."""
    os.environ.update(python_backend_env(os.environ))
    found = stub_libpython(os.environ)
    own = libpython_path()
    if found is not None and found.resolve() != own.resolve():
        raise FlareError(None, f"Triton's Python backend stub would load {found}, not this interpreter's {own}")


# ------------------------------------------------------------------------------------------------ the model
def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InputError(None, f"request parameter {name}={value!r} is not a boolean")


def _number(value: Any, name: str, kind: type) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise InputError(None, f"request parameter {name}={value!r} is not {'an integer' if kind is int else 'a number'}"
                         ) from None
    if isinstance(value, bool):  # JSON true is no count of folds
        raise InputError(None, f"request parameter {name}={value!r} is not {'an integer' if kind is int else 'a number'}")
    if kind is int and isinstance(value, float) and value != number:
        raise InputError(None, f"request parameter {name}={value!r} is not an integer")
    return number


class FlareModel:
    """One Triton model instance: a loaded Segmenter answering requests (a PyTriton inference callable)."""

    def __init__(self, segmenter: Any) -> None:
        self.segmenter = segmenter

    def __call__(self, requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Answer ``requests``; when one fails, the requests' input arrays are dropped (PyTriton keeps the request
        objects until the error is sent, and the image bytes with them) and the memory is given back before the
        error goes out."""
        out = []
        try:
            for request in requests:
                try:
                    data, params = request.data, dict(request.parameters or {})
                except Exception as err:  # noqa: BLE001 - a request PyTriton could not unpack: still one line
                    raise RequestError(f"request: cannot read the request ({type(err).__name__})") from None
                out.append(self.infer(data, params))
        except RequestError:
            data = params = {}
            for request in requests:
                with contextlib.suppress(Exception):  # whatever PyTriton handed over
                    request.data.clear()
            return_memory()
            raise
        return out

    def infer(self, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """One request: NIfTI bytes in, label-map NIfTI bytes and the JSON report out. Every failure is one
        :class:`RequestError` line (its frame holds no reference to the request)."""
        name = request_name(params.get("filename"))
        try:
            labels, report = self._segment(inputs, params, name)
        except FlareError as err:
            log.warning("request rejected: %s", err)
            error = RequestError(str(err))
        except MemoryError:
            log.warning("request failed: %s: out of memory", name)
            error = RequestError(f"{name}: out of memory on the server")
        except Exception as err:
            log.exception("request failed: %s", name)
            error = RequestError(f"{name}: internal server error ({type(err).__name__})")
        else:
            return {OUTPUT_LABELS: np.array([labels], dtype=object),
                    OUTPUT_REPORT: np.array([json.dumps(report).encode()], dtype=object)}
        inputs = params = {}  # drop this frame's references to the request (the caller gives memory back)
        raise error

    def _segment(self, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any], name: str
                 ) -> tuple[bytes, dict[str, Any]]:
        from flare.runtime.image.nifti import label_bytes, read_image_bytes

        image = inputs.get(INPUT)
        if image is None or image.size != 1 or not isinstance(image.flat[0], bytes):
            raise InputError(name, f"the request needs one BYTES element in input {INPUT!r}")
        limit = max_request_bytes()
        if len(image.flat[0]) > limit:
            raise InputError(name, f"the request's image is {len(image.flat[0])} bytes, more than the limit of "
                                   f"{limit} ({ENV_REQUEST_BYTES})")
        folds = None if params.get("folds") is None else _number(params["folds"], "folds", int)
        overlap = None if params.get("overlap") is None else _number(params["overlap"], "overlap", float)
        compressed = _flag(params.get("compressed", True), "compressed")
        postprocess = None if params.get("postprocess") is None else str(params["postprocess"])
        seg = self.segmenter.with_options(folds=folds, overlap=overlap, postprocess=postprocess)
        img = read_image_bytes(image.flat[0], name, preflight=seg.check_grids)  # grid limits from the header
        result = seg.segment(img)
        return label_bytes(result.labels, img, compressed), result.report.to_json()


def max_request_bytes() -> int:
    """``FLARE_MAX_REQUEST_BYTES`` (K/M/G suffixes), default :data:`MAX_REQUEST_BYTES`."""
    from flare.runtime.pipeline.limits import parse_size

    text = os.environ.get(ENV_REQUEST_BYTES)
    return parse_size(text, ENV_REQUEST_BYTES) if text else MAX_REQUEST_BYTES


# ------------------------------------------------------------------------------------------------ the server
_PROXY_RAISE = """                if triton_responses_or_error is not None and isinstance(triton_responses_or_error, Exception):
                    raise triton_responses_or_error
"""
_PROXY_RESPOND = """                if triton_responses_or_error is not None and isinstance(triton_responses_or_error, Exception):
                    return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(triton_responses_or_error).strip()))
                            for _ in triton_requests]  # flare: the error alone, not the stub's traceback
"""


def one_line_errors(model_class: Any) -> bool:
    """Make the proxy model PyTriton runs inside Triton answer a failed request with the error text alone.

    PyTriton 0.7's proxy model (``pytriton/proxy/model.py``, copied into Triton's model repository) *raises* a failed
    request's error inside ``execute``, which Triton reports as ``Model execute error: Traceback ...`` with the
    proxy's stack. Returning ``InferenceResponse(error=TritonError(message))`` instead is the Python backend's way to
    fail a request, and the client gets exactly the message (one ``flare-error: ...`` line). The proxy's text is
    patched when PyTriton hands it to Triton; with another PyTriton (the lines differ) nothing is patched and False is
    returned (the errors then keep the proxy's stack, still with the one ``flare-error:`` line in it)."""
    source = (Path(model_class.__module__ and sys.modules[model_class.__module__].__file__ or "").parent.parent
              / "proxy" / "model.py")
    try:
        if _PROXY_RAISE not in source.read_text():
            return False
    except OSError:
        return False
    original_files, original_generate = model_class.get_proxy_model_files, model_class.generate_model

    def get_proxy_model_files(self: Any) -> dict[str, bytes]:
        files = original_files(self)
        return {k: (v.decode().replace(_PROXY_RAISE, _PROXY_RESPOND).encode() if k.endswith("/model.py") else v)
                for k, v in files.items()}

    def generate_model(self: Any, model_repository: Path) -> None:
        original_generate(self, model_repository)
        target = Path(model_repository) / self.model_name / str(self.model_version) / "model.py"
        target.write_text(target.read_text().replace(_PROXY_RAISE, _PROXY_RESPOND))

    if not getattr(model_class, "_flare_one_line_errors", False):
        model_class.get_proxy_model_files, model_class.generate_model = get_proxy_model_files, generate_model
        model_class._flare_one_line_errors = True
    return True


def wait_model_ready(host: str, port: int, timeout_s: float = READY_WAIT_S) -> None:
    """Wait until ``GET /v2/models/flare/ready`` answers 200 (Triton's ``/v2/health/ready`` answers 200 before
    PyTriton has loaded the model); FlareError after ``timeout_s``."""
    import time
    import urllib.error
    import urllib.request

    probe = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://{f'[{probe}]' if ':' in probe else probe}:{port}/v2/models/{MODEL}/ready"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise FlareError(None, f"model '{MODEL}' did not become ready within {timeout_s:.0f} s ({url})")
        time.sleep(0.2)


def check_ports_free(host: str, ports: Mapping[str, int]) -> None:
    """FlareError when a port cannot be bound on ``host`` (in use, or ``host`` is not a local address): PyTriton
    would otherwise talk to whatever server already listens there."""
    import socket

    if len(set(ports.values())) < len(ports):
        raise FlareError(None, f"the ports must differ: {', '.join(f'{k} {v}' for k, v in ports.items())}")
    for what, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver does
            try:
                sock.bind((host, port))
            except OSError as err:
                raise FlareError(None, f"cannot listen on {host}:{port} (--{what}-port): {err.strerror or err}"
                                 ) from None


def loopback_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (picked by the kernel) for Triton's own endpoints."""
    import socket

    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class _StopOnSignal:
    """SIGTERM does what Ctrl-C does (PyTriton's serve() stops Triton gracefully on KeyboardInterrupt); further
    signals during the stop are ignored so that it completes; ``received`` holds the signal.

    The stop has a deadline (:data:`STOP_DEADLINE_S`): a request still computing when Triton's grace period ends
    keeps PyTriton's shutdown waiting for it (an hour for a huge one); at the deadline the process removes its
    working folder ``work`` and ends. :meth:`disarm` (when serve() returns, however) cancels the deadline and puts
    the previous handlers back."""

    def __init__(self, work: Path) -> None:
        import threading

        self.work = work
        self.received: list[int] = []
        self.timer = threading.Timer(STOP_DEADLINE_S, self._deadline)
        self.timer.daemon = True
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _deadline(self) -> None:
        print(f"flare-serve: the stop did not finish within {STOP_DEADLINE_S} s (a request still computing?); "
              "ending the process", file=sys.stderr, flush=True)
        shutil.rmtree(self.work, ignore_errors=True)
        sys.stdout.flush()
        os._exit(0)

    def _handler(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.received.append(signum)
        self.timer.start()
        raise KeyboardInterrupt

    def disarm(self) -> None:
        self.timer.cancel()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def parse_devices(text: str) -> list[int]:
    """``--devices 0,1,3`` → ``[0, 1, 3]`` (CUDA device indices, distinct); FlareError otherwise."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise FlareError(None, f"--devices {text!r}: give CUDA device indices separated by commas, e.g. 0,1")
    ids = [int(p) for p in parts]
    if len(set(ids)) < len(ids):
        raise FlareError(None, f"--devices {text!r} names a device twice")
    return ids


def instance_devices(device: str, devices: Sequence[int] | None, instances: int | None) -> list[str]:
    """The device of each model instance: without ``devices``, ``instances`` (default 1) times ``device``; with
    ``devices``, the instances (default one per GPU) go round-robin over ``cuda:N`` for N in ``devices``
    (``--device`` must then be ``auto``, ``cuda`` or ``gpu``)."""
    if devices is None:
        return [device] * (instances or 1)
    if device.strip().lower() not in ("auto", "cuda", "gpu"):
        raise FlareError(None, f"--devices puts the instances on CUDA devices; --device {device} contradicts it")
    n = instances or len(devices)
    return [f"cuda:{devices[i % len(devices)]}" for i in range(n)]


def load_models(loaded: Any, devices: Sequence[str], gpu_mem_budget: float | None, segmenter: Any = None,
                engine: str = CpuEngine.onnxruntime.value) -> list[FlareModel]:
    """One FlareModel (a Segmenter on its device, with the CPU ``engine``) per entry of ``devices``; CPU threads are
    shared out between the instances that run on the CPU."""
    factory = segmenter
    if factory is None:
        from flare.runtime.pipeline.segmenter import Segmenter

        factory = Segmenter
    threads = None if len(devices) == 1 else max(1, (os.cpu_count() or 1) // len(devices))
    return [FlareModel(factory(loaded, device=dev, threads=threads, gpu_mem_budget=gpu_mem_budget, engine=engine))
            for dev in devices]


def serve(bundle: Path, *, device: str = "auto", host: str = "127.0.0.1", http_port: int = 8000,
          grpc_port: int = 8001, metrics_port: int = 8002, instances: int | None = None,
          gpu_mem_budget: float | None = None, verbose: bool = False, devices: Sequence[int] | None = None,
          engine: str = CpuEngine.onnxruntime.value) -> None:
    """Load the model instances (``instances`` Segmenters on ``device``, or spread over the CUDA ``devices``; on the
    CPU with ``engine``), start Triton with model ``flare`` and serve until SIGTERM/SIGINT."""
    from flare.runtime.bundle.manifest import load_bundle
    from flare.runtime.serving.front import GrpcFront, HttpFront
    from flare.runtime.serving.gate import InferGate

    per_instance = instance_devices(device, devices, instances)
    triton_mod = lazy_import("pytriton.triton", "serve").load()
    config_mod = lazy_import("pytriton.model_config", "serve").load()
    check_ports_free(host, {"http": http_port, "grpc": grpc_port, "metrics": metrics_port})
    if not one_line_errors(lazy_import("pytriton.models.model", "serve").load().Model):
        log.warning("this PyTriton's proxy model is not the one flare knows: rejected requests keep its stack")
    prepare_server_environment()
    _quiet_pytriton(verbose)
    limit = max_request_bytes()
    loaded = load_bundle(bundle)
    models = load_models(loaded, per_instance, gpu_mem_budget, engine=engine)
    seg = models[0].segmenter
    work = Path(tempfile.mkdtemp(prefix="flare-serve-"))  # Triton's log and PyTriton's workspace
    triton_log = None if verbose else work / "tritonserver.log"
    # Triton listens on loopback ports of its own; the public ports are the bounded fronts
    inner_http, inner_grpc, inner_metrics = loopback_ports(3)
    config = triton_mod.TritonConfig(http_address="127.0.0.1", http_port=inner_http, grpc_address="127.0.0.1",
                                     grpc_port=inner_grpc, metrics_address="127.0.0.1", metrics_port=inner_metrics,
                                     exit_timeout_secs=EXIT_TIMEOUT_S, log_verbose=1 if verbose else 0,
                                     log_file=triton_log, allow_gpu_metrics=seg.device == "cuda")
    gate = InferGate(seg.check_grids)  # inference requests are checked from their first bytes at the fronts
    fronts = [HttpFront(host, http_port, inner_http, limit, ENV_REQUEST_BYTES, gate),
              GrpcFront(host, grpc_port, inner_grpc, limit, gate=gate),
              HttpFront(host, metrics_port, inner_metrics, METRICS_MAX_BODY, "the metrics port")]
    where = "rerun with --verbose" if triton_log is None else f"Triton's log: {triton_log}"
    tensor, model_config = config_mod.Tensor, config_mod.ModelConfig
    stop = _StopOnSignal(work)
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            with triton_mod.Triton(config=config, workspace=work / f"pytriton-{attempt}") as triton:  # bind() loads it
                try:
                    triton.bind(model_name=MODEL, infer_func=models,
                                inputs=[tensor(name=INPUT, dtype=object, shape=(1,))],
                                outputs=[tensor(name=OUTPUT_LABELS, dtype=object, shape=(1,)),
                                         tensor(name=OUTPUT_REPORT, dtype=object, shape=(1,))],
                                config=model_config(batching=False), strict=True)
                    triton.run()
                    for front in fronts:  # after Triton's start: gRPC's threads must not see PyTriton's fork
                        front.start()
                    wait_model_ready(host, http_port)
                except FlareError:
                    raise
                except Exception as err:
                    # PyTriton gives instances 2..N of a model 1 s to reach instance 1's handshake socket; on a busy
                    # machine that can fail the model load: start Triton again (the Segmenters stay loaded)
                    if attempt == START_ATTEMPTS or "load failed for model" not in str(err):
                        raise
                    log.warning("the model did not load (%s); starting Triton again (attempt %d of %d)",
                                str(err).strip().splitlines()[0][:200], attempt + 1, START_ATTEMPTS)
                    continue
                print(f"flare-serve: ready: model '{MODEL}' on http://{host}:{http_port} (gRPC {host}:{grpc_port}, "
                      f"metrics http://{host}:{metrics_port}/metrics); bundle {loaded.root}, {len(seg.engines)} "
                      f"fold(s), device(s) {', '.join(_device_names(models))}, {len(models)} instance(s); requests "
                      f"up to {limit} bytes ({ENV_REQUEST_BYTES}); Triton's log: {triton_log or 'stdout'}; SIGTERM "
                      f"or Ctrl-C stops", file=sys.stderr, flush=True)
                triton.serve()
                break
    except KeyboardInterrupt:
        pass
    except FlareError:
        raise
    except Exception as err:  # noqa: BLE001 - PyTriton raises several kinds when tritonserver fails or dies
        raise FlareError(None, f"Triton failed ({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}); "
                               f"{where}") from None
    finally:
        stop.disarm()  # the stop has finished (or failed): no deadline, the caller's signal handlers again
        for front in fronts:
            front.stop()
    if not stop.received:  # serve() also returns when tritonserver or the proxy model dies
        raise FlareError(None, f"the Triton server stopped unexpectedly ({where})")
    shutil.rmtree(work, ignore_errors=True)
    print("flare-serve: stopped", file=sys.stderr, flush=True)


def _device_names(models: Sequence[FlareModel]) -> list[str]:
    names = []
    for m in models:
        dev = m.segmenter.dev
        name = f"cuda:{dev.device_id}" if dev.name == "cuda" else dev.name
        names.append(name)
    return sorted(set(names))


def _quiet_pytriton(verbose: bool) -> None:
    """PyTriton logs every failed request with a traceback; FlareModel logs one line instead."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="flare-serve: %(levelname)s: %(message)s")
    logging.getLogger("pytriton").setLevel(logging.INFO if verbose else logging.ERROR)


# ------------------------------------------------------------------------------------------------ CLI
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Serve flare segmentation on NVIDIA Triton Inference Server (HTTP/gRPC, Prometheus metrics).")


@app.command()
def main_command(
    bundle: Annotated[Path | None, typer.Option("--bundle", "-b",
                      help="Bundle folder. Default: $FLARE_BUNDLE, else ~/.cache/flare/bundle.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, gpu, cuda:N or gpu:N.")] = "auto",
    devices: Annotated[str | None, typer.Option(help="CUDA devices to spread the instances over, e.g. 0,1 "
                       "(round-robin; default --instances: one per device).", show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; 0.0.0.0 exposes the server).")
                    ] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(min=1, max=65535, help="Triton HTTP/REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(min=1, max=65535, help="Triton gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(min=1, max=65535, help="Prometheus metrics port.")] = 8002,
    instances: Annotated[int | None, typer.Option(min=1, max=64,
                         help="Model instances (each loads the models once and serves one request at a time; "
                              "default 1, with --devices one per device).", show_default=False)] = None,
    gpu_mem_budget: Annotated[float | None, typer.Option(min=500.0,
                              help="GPU memory budget per instance in MB (default: flare-run's).")] = None,
    engine: Annotated[CpuEngine, typer.Option(help="CPU engine: onnxruntime, or openvino (fp32 only; extra "
                      "'openvino'; implies --device cpu).")] = CpuEngine.onnxruntime,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Triton's and PyTriton's own logs on stdout "
                       "(default: Triton's log goes to a temporary file, named on errors).")] = False,
) -> None:
    """Serve model 'flare': NIfTI bytes in, the label map (NIfTI bytes) and the JSON report out."""
    from flare.runtime.bundle.manifest import default_bundle_dir

    try:
        serve(bundle or default_bundle_dir(), device=device, host=host, http_port=http_port, grpc_port=grpc_port,
              metrics_port=metrics_port, instances=instances, gpu_mem_budget=gpu_mem_budget, verbose=verbose,
              devices=None if devices is None else parse_devices(devices), engine=engine.value)
    except FlareError as err:
        typer.echo(f"flare-serve: error: {err}", err=True)
        raise typer.Exit(2) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
