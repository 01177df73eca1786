"""Running work on a Dask cluster: the generic machinery that ``napari-sclip segment --workers N``
and ``--scheduler ADDRESS`` build on (no napari, no dataset logic).

* :func:`open_client` gives a :class:`distributed.Client`, either of a local cluster of worker
  processes started here and torn down on exit, or of an existing cluster's scheduler;
* :class:`SegmenterPlugin` (registered by :func:`install_segmenter`) builds one
  :class:`~napari_sclip.engine.segmenter.Segmenter` per worker process and loads its model once,
  when the worker starts or the plugin is installed; a task gets it from :func:`worker_segmenter`;
* :func:`map_bounded` runs a function on a stream of items with a bounded number of tasks in
  flight, yielding results as they complete.

``distributed`` is an optional dependency (the ``cluster`` extra, or ``pip install distributed``): it is only
imported inside the functions, so importing this module never needs it.

Failures.  A worker process that dies (killed, out of memory, its node lost) takes the tasks it
was running with it; the scheduler runs them again elsewhere, up to its
``distributed.scheduler.allowed-failures`` deaths per task (3 by default), and then fails the task
with :class:`distributed.KilledWorker`.  A task that raises an exception is not run again unless
``retries`` asks for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_sclip.engine.errors import SclipError

if TYPE_CHECKING:
    from distributed import Client

    from napari_sclip.engine.segmenter import Segmenter

#: Name of the segmenter's worker plugin: one per cluster.
PLUGIN_NAME = "napari-sclip-segmenter"
#: Seconds that :func:`open_client` waits for an existing scheduler by default.
DEFAULT_CONNECT_TIMEOUT = 10.0
_INSTALL_HINT = ("the cluster options need the 'distributed' package: pip install distributed "
                 "(or, in a clone of napari-sclip, pip install -e '.[cluster]')")


class ClusterError(SclipError):
    """The cluster cannot be started or reached, or a task ran outside of it."""


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ClusterError(_INSTALL_HINT) from None
    return distributed


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# -- clients ---------------------------------------------------------------------------------------


@contextmanager
def open_client(
    workers: int | None = None,
    scheduler: str | None = None,
    *,
    threads_per_worker: int = 1,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    log_level: int = logging.CRITICAL,
) -> Iterator[Client]:
    """A :class:`distributed.Client` for the ``with`` block.

    Exactly one of ``workers`` (start a local cluster of that many worker processes, each with
    ``threads_per_worker`` threads, no dashboard; it is shut down when the block ends) and
    ``scheduler`` (the address of a running cluster's scheduler, e.g. ``tcp://host:8786``, which is
    left running) must be given.  ``log_level`` silences the local cluster's log messages below
    it.  Problems are a :class:`ClusterError` with a one-line message.
    """
    if workers is None and scheduler is None:
        raise ClusterError("give a number of local workers or a Dask scheduler address")
    if workers is not None and scheduler is not None:
        raise ClusterError("give a number of local workers or a Dask scheduler address, not both")
    for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ClusterError(f"the number of {name.replace('_', ' ')} must be at least 1, got {value!r}")
    distributed = _import_distributed()
    if scheduler is not None:
        address = str(scheduler).strip()
        if not address:
            raise ClusterError("the Dask scheduler address is empty")
        try:
            # Probed first: a Client that fails to connect stays half-built, and closing it when
            # the interpreter exits waits 20 s and prints a traceback.
            _probe(address, connect_timeout)
            client = distributed.Client(address, timeout=connect_timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {address}: {_one_line(exc)}") from None
        # The client logs a lost scheduler with a traceback; the run reports it in one line.
        client_log = logging.getLogger("distributed.client")
        level = client_log.level
        client_log.setLevel(max(level, log_level))
        try:
            yield client
        finally:
            try:
                client.close()
            finally:
                client_log.setLevel(level)
        return

    import dask

    # Ctrl+C reaches every process of the terminal's group: worker processes that inherit an
    # ignored SIGINT leave it to this one, which stops them (else each prints a traceback).
    # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc hand memory back
    # after every image and doubled the time per image here (page faults; docs/benchmarks.md).
    ignoring = _IgnoringSigint()
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=threads_per_worker,
                processes=True,
                dashboard_address=None,
                # The scheduler serves a few HTTP routes even without a dashboard, on port 8787 unless
                # told otherwise (with a warning when that port is taken): any free local port.
                scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
                silence_logs=log_level,
            )
    except Exception as exc:  # ports, resources, a worker that cannot start
        hint = ""
        if "Nanny failed to start" in str(exc):
            hint = ' (in a script, start it under if __name__ == "__main__":, which worker processes skip)'
        raise ClusterError(f"cannot start a local Dask cluster of {workers} workers: {_one_line(exc)}{hint}") from None
    finally:
        ignoring.close()
    try:
        client = distributed.Client(cluster, set_as_default=False)
    except BaseException:
        cluster.close()
        raise
    try:
        yield client
    finally:
        try:
            client.close()
        finally:
            cluster.close()


class _IgnoringSigint:
    """SIGINT ignored from now until :meth:`close` (only in the main thread; elsewhere a no-op)."""

    def __init__(self):
        import signal
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def close(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _reach(address: str, timeout: float) -> None:
    """A TCP connection to a ``tcp://`` or ``tls://`` address, opened and closed: an unknown host
    or a refused connection says so at once (Dask's own connect retries until its timeout)."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        if scheme in ("ws", "wss", "ucx"):
            return
        raise ValueError(f"{scheme}:// is not a scheduler's network address; write tcp://HOST:PORT")
    host, port = parse_host_port(location, default_port=8786)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range (1 to 65535)")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise OSError(f"unknown host {host!r}") from None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        raise OSError(f"connection refused by {host}:{port}: is the scheduler running, on that port?") from None


def _probe(address: str, timeout: float) -> None:
    """Open and close a connection to ``address``; raises what connecting raises."""
    import asyncio
    import threading

    from distributed.comm import connect

    _reach(address, timeout)

    async def probe():
        comm = await connect(address, timeout=timeout)
        await comm.close()

    failure: list[BaseException] = []

    def run():  # in a thread of its own, so that a caller running an event loop can call it too
        try:
            # The whole handshake has a deadline: a server that accepts and never answers (a
            # dashboard's port, any other service) would otherwise hold the run forever.
            asyncio.run(asyncio.wait_for(probe(), timeout))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="napari-sclip-probe", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if failure:
        exc = failure[0]
        if isinstance(exc, (OSError, TimeoutError, ValueError, TypeError)):
            raise exc
        # Garbage where a scheduler's handshake should be (a web server, say) fails anywhere in
        # the parser: a MemoryError for an absurd length, a decoding error, ...
        raise ValueError(f"it answered, but not as a Dask scheduler ({type(exc).__name__})") from None


# -- the segmenter on each worker --------------------------------------------------------------------


def _worker_index(name: Any) -> int:
    """A worker's position for spreading workers over devices: its name when that is a number
    (a local cluster names its workers 0, 1, ...; a restarted worker keeps its name), the number
    that ends it (``SLURMCluster-3``), else a stable hash of it."""
    if isinstance(name, int) and not isinstance(name, bool):
        return name
    match = re.search(r"(\d+)$", str(name))
    if match:
        return int(match.group(1))
    return zlib.crc32(str(name).encode())


def choose_device(device: str | None, devices: Sequence[str] | None, worker_name: Any,
                  cuda_devices: int) -> str | None:
    """The device a worker's segmenter runs on.

    An explicit ``device`` (other than ``"auto"``) is used as is.  Otherwise ``devices``, when
    given, is shared out round-robin by worker (worker ``i`` gets ``devices[i % len(devices)]``);
    without it, a worker that sees several CUDA GPUs takes ``cuda:(i % count)``, so that the local
    workers of a multi-GPU machine do not all use the first one.  ``None`` leaves the choice to
    :class:`~napari_sclip.engine.segmenter.Segmenter` (``$NAPARI_SCLIP_DEVICE``, else ``auto``).
    """
    if device not in (None, "auto"):
        return device
    index = _worker_index(worker_name)
    if devices:
        return str(devices[index % len(devices)])
    if cuda_devices > 1:
        return f"cuda:{index % cuda_devices}"
    return device


def _read_model_configs(paths: Iterable[str | Path] | Mapping[str, Mapping] | None) -> dict[str, str]:
    """``{model name: config JSON text}`` of open_clip model-config files (the name is the file's
    stem, as open_clip has it), read here so that workers need not see the files; or of a mapping
    ``{model name: config}`` (what ``open_clip.get_model_config`` gives)."""
    if isinstance(paths, Mapping):
        return {str(name): json.dumps(config) for name, config in paths.items()}
    configs = {}
    for path in paths or ():
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            json.loads(text)
        except (OSError, ValueError) as exc:
            raise ClusterError(f"cannot read the model config {path}: {_one_line(exc)}") from None
        configs[path.stem] = text
    return configs


def _base_plugin_class():
    try:
        from distributed.diagnostics.plugin import WorkerPlugin
    except ImportError:  # the module stays importable; the plugin is only usable with distributed
        return object
    return WorkerPlugin


class SegmenterPlugin(_base_plugin_class()):
    """A Dask worker plugin that gives each worker process one loaded
    :class:`~napari_sclip.engine.segmenter.Segmenter`.

    ``segmenter_kwargs`` are the segmenter's arguments (``model``, ``pretrained``, ``device``,
    ``method``, ...); they must make sense on the workers (a checkpoint path must be one they can
    read).  ``model_configs`` are open_clip model-config JSON files for models open_clip does not
    know; their contents travel with the plugin and each worker registers them before building
    the segmenter.  ``devices`` spreads the workers over devices when the device is ``"auto"``
    or not given (:func:`choose_device`).  ``torch_threads`` sets the worker's number of torch
    CPU threads: a Dask nanny starts each worker process with ``OMP_NUM_THREADS=1``, so without
    it a worker runs the model on one CPU core (which is what a GPU worker needs).

    The model is loaded in ``setup``: when the plugin is installed on the running workers, and
    when a worker (a new one, or one restarted after a crash) joins the cluster, before it runs
    any task.  :func:`worker_segmenter` returns it inside a task.
    """

    name = PLUGIN_NAME
    idempotent = False

    def __init__(
        self,
        segmenter_kwargs: Mapping[str, Any] | None = None,
        *,
        model_configs: Iterable[str | Path] | None = None,
        devices: Sequence[str] | None = None,
        torch_threads: int | None = None,
    ):
        if torch_threads is not None and (isinstance(torch_threads, bool) or not isinstance(torch_threads, int)
                                          or torch_threads < 1):
            raise ClusterError(f"torch_threads must be a positive integer, got {torch_threads!r}")
        self.torch_threads = torch_threads
        self.segmenter_kwargs = dict(segmenter_kwargs or {})
        self.model_configs = _read_model_configs(model_configs)
        self.devices = [str(device) for device in devices] if devices else None
        self.fingerprint = hashlib.sha256(
            json.dumps([self.segmenter_kwargs, self.model_configs, self.devices, self.torch_threads],
                       sort_keys=True, default=str).encode()
        ).hexdigest()
        self.segmenter: Segmenter | None = None
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.lock = None  # made on the worker: tasks in several threads take turns with the model

    def __getstate__(self):
        # What travels to the workers: the recipe, never a worker's loaded segmenter.
        state = dict(self.__dict__)
        state.update(segmenter=None, error=None, load_seconds=None, lock=None)
        return state

    def _build(self, worker_name: Any, directory: str) -> None:
        import time

        import open_clip

        from napari_sclip.engine.segmenter import Segmenter

        start = time.perf_counter()
        if self.torch_threads is not None:
            import torch

            torch.set_num_threads(self.torch_threads)
        if self.model_configs:
            folder = Path(directory) / "napari-sclip-model-configs"
            folder.mkdir(parents=True, exist_ok=True)
            for name, text in self.model_configs.items():
                path = folder / f"{name}.json"
                path.write_text(text, encoding="utf-8")
                open_clip.add_model_config(path)
        kwargs = dict(self.segmenter_kwargs)
        cuda = 0
        if kwargs.get("device") in (None, "auto") and not self.devices:
            cuda = _cuda_device_count()
        device = choose_device(kwargs.get("device"), self.devices, worker_name, cuda)
        if device is not None:
            kwargs["device"] = device
        segmenter = Segmenter(**kwargs)
        segmenter.load()
        self.segmenter = segmenter
        self.load_seconds = time.perf_counter() - start

    async def setup(self, worker) -> None:
        import asyncio
        import threading

        self.lock = threading.Lock()

        # In a thread, so that the worker keeps answering the scheduler while the model loads.
        try:
            await asyncio.to_thread(self._build, worker.name, worker.local_directory)
        except Exception as exc:
            self.error = _one_line(exc)
            raise

    def teardown(self, worker) -> None:
        if self.segmenter is not None:
            from napari_sclip.engine.model import clear_model_cache

            self.segmenter = None
            clear_model_cache()  # frees the model's (GPU) memory when the plugin is replaced


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no torch build with CUDA, a driver problem: then there are none to share
        return 0


def install_segmenter(
    client: Client,
    segmenter_kwargs: Mapping[str, Any] | None = None,
    model_configs: Iterable[str | Path] | None = None,
    *,
    devices: Sequence[str] | None = None,
    torch_threads: int | None = None,
) -> SegmenterPlugin:
    """Register a :class:`SegmenterPlugin` with ``client``'s cluster, which loads the model on every
    worker now (waiting for them) and on every worker that joins later.

    Installing the same segmenter again is a no-op; another one replaces it (each worker frees
    the previous model).  A worker that cannot load the model raises its error here (a
    :class:`~napari_sclip.engine.errors.ModelError`, for instance).
    """
    plugin = SegmenterPlugin(segmenter_kwargs, model_configs=model_configs, devices=devices,
                             torch_threads=torch_threads)
    current = client.run(_installed_fingerprint, on_error="return")
    broken = {worker: value for worker, value in current.items() if isinstance(value, BaseException)}
    if broken:
        worker, exc = next(iter(broken.items()))
        raise ClusterError(f"Dask worker {_worker_label(client, worker)} cannot run napari-sclip "
                           f"({type(exc).__name__}: {_one_line(exc)}){_ENVIRONMENT_HINT}")
    if current and all(value == plugin.fingerprint for value in current.values()):
        return plugin
    register = getattr(client, "register_plugin", None) or client.register_worker_plugin
    try:
        register(plugin, name=PLUGIN_NAME)
    except BaseException as exc:
        # The scheduler keeps a plugin whose setup failed and would give it to every worker that
        # joins later: take it back, so that the cluster is left without a segmenter, not a broken one.
        try:
            client.unregister_worker_plugin(PLUGIN_NAME)
        except Exception:
            pass
        if isinstance(exc, Exception) and not isinstance(exc, SclipError):  # a worker's environment
            raise ClusterError(f"a Dask worker could not set up the model ({type(exc).__name__}: "
                               f"{_one_line(exc)}){_ENVIRONMENT_HINT}") from None
        raise
    return plugin


#: Said after a worker's import or setup failure.
_ENVIRONMENT_HINT = "; every worker needs napari-sclip and its dependencies installed, as here"


def _worker_label(client: Client, address: str) -> str:
    """A worker's name where it has one (``dask worker --name``), else its address."""
    try:
        name = client.scheduler_info()["workers"][address].get("name")
    except Exception:
        name = None
    return f"{name} ({address})" if name not in (None, address) else address


def _installed_fingerprint(dask_worker) -> str | None:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if plugin is None or getattr(plugin, "segmenter", None) is None:
        return None
    return getattr(plugin, "fingerprint", None)


def worker_segmenter() -> Segmenter:
    """The loaded segmenter of the worker that runs the calling task (see
    :func:`install_segmenter`).  It is the same object for every task on that worker; with more
    than one thread per worker, tasks must not use it at the same time: see
    :func:`using_worker_segmenter`."""
    return _worker_plugin().segmenter


@contextmanager
def using_worker_segmenter() -> Iterator[Segmenter]:
    """:func:`worker_segmenter`, held for the ``with`` block: the tasks of a worker that runs
    several at once (``threads_per_worker > 1``) take turns with the model, and can read and
    write their files at the same time outside the block."""
    plugin = _worker_plugin()
    with plugin.lock:
        yield plugin.segmenter


def _worker_plugin() -> SegmenterPlugin:
    distributed = _import_distributed()
    try:
        worker = distributed.get_worker()
    except ValueError:
        raise ClusterError("worker_segmenter() only works inside a task running on a Dask worker") from None
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None:
        raise ClusterError(
            f"no segmenter on Dask worker {worker.name}: install one first (install_segmenter)"
        )
    if plugin.segmenter is None:
        reason = plugin.error or "it is not loaded"
        raise ClusterError(f"the segmenter of Dask worker {worker.name} could not be loaded: {reason}")
    return plugin


# -- bounded map -----------------------------------------------------------------------------------


def map_bounded(
    client: Client,
    function: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    max_in_flight: int | Callable[[], int],
    key_prefix: str,
    retries: int = 0,
    return_exceptions: bool = False,
) -> Iterator[tuple[int, Any]]:
    """``(index, function(item))`` for every item of ``items``, computed on the cluster, in the
    order the tasks complete; ``index`` is the item's position in ``items``.

    At most ``max_in_flight`` tasks are outstanding at any time, and ``items`` is read only as
    tasks complete, so a stream of a million items takes bounded memory; an iterator (not a
    generator) that has run dry is asked again after each result.  A callable
    ``max_in_flight`` is asked again while tasks run, so that a limit that follows the cluster's
    workers grows as workers join.  Each task's key is
    ``f"{key_prefix}-{token}-{index}"``, with a token unique to this call: a task that the
    scheduler runs again after its worker died keeps its key, and two calls never share one.

    A task that raises makes the iteration raise the same exception (with ``return_exceptions``,
    ``(index, exception)`` is yielded instead), after the task has been tried ``1 + retries``
    times; a task whose workers kept dying raises :class:`distributed.KilledWorker`.  Ending the
    iteration early (``break``, ``close()``, an exception, Ctrl+C) cancels the outstanding tasks.
    """
    if not callable(max_in_flight) and (isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int)
                                        or max_in_flight < 1):
        raise ValueError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
    distributed = _import_distributed()
    return _map_bounded(distributed, client, function, items, max_in_flight, key_prefix, retries,
                        return_exceptions)


def _map_bounded(distributed, client, function, items, max_in_flight, key_prefix, retries,
                 return_exceptions) -> Iterator[tuple[int, Any]]:
    token = uuid.uuid4().hex[:12]
    source = enumerate(items)
    pending: dict[Any, int] = {}  # future -> index
    completed = distributed.as_completed(loop=client.loop, with_results=True, raise_errors=False)

    def submit_one() -> bool:
        try:
            index, item = next(source)
        except StopIteration:
            return False
        future = client.submit(function, item, key=f"{key_prefix}-{token}-{index}",
                               retries=retries or None, pure=False)
        pending[future] = index
        completed.add(future)
        return True

    def top_up() -> None:
        limit = max(1, max_in_flight()) if callable(max_in_flight) else max_in_flight
        while len(pending) < limit and submit_one():
            pass

    try:
        top_up()
        while pending:
            if not completed.has_ready():
                time.sleep(0.05)
                top_up()  # workers may have joined
                continue
            future, result = next(completed)
            index = pending.pop(future)
            status = future.status
            del future  # released: the scheduler forgets the task, its worker drops the result
            top_up()  # keep the cluster busy while the caller handles this result
            if status == "error":
                _, exc, traceback = result
                if return_exceptions:
                    result = exc
                else:
                    raise exc.with_traceback(traceback)
            elif status == "cancelled":
                raise result if isinstance(result, BaseException) else distributed.CancelledError(index)
            yield index, result
            del result
            top_up()  # an iterator that had run dry may offer more once the caller has a result
    finally:
        if pending:
            client.cancel(list(pending))
            pending.clear()


__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "PLUGIN_NAME",
    "ClusterError",
    "SegmenterPlugin",
    "choose_device",
    "install_segmenter",
    "map_bounded",
    "open_client",
    "using_worker_segmenter",
    "worker_segmenter",
]
