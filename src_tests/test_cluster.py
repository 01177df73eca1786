"""napari_sclip.dataset.cluster on real local Dask clusters of worker processes: the segmenter
plugin, the bounded map, worker deaths, and the client's errors and shutdown.

One cluster of two workers serves the module; the test that kills a worker starts its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from napari_sclip.dataset import cluster
from napari_sclip.dataset.cluster import (
    ClusterError,
    install_segmenter,
    map_bounded,
    open_client,
    using_worker_segmenter,
    worker_segmenter,
)
from napari_sclip.engine.errors import SclipError

from conftest import TINY_MODEL

pytest.importorskip("distributed")
pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]


def _segmenter_kwargs(tiny_checkpoint) -> dict:
    return {"model": TINY_MODEL, "pretrained": str(tiny_checkpoint), "device": "cpu",
            "feature_cache": False}


@pytest.fixture(scope="module")
def module_client(tiny_dir, tmp_path_factory):
    """Two worker processes, with the test environment (own cache folder, no NAPARI_SCLIP_*)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("NAPARI_SCLIP_"):
                patch.delenv(name)
        patch.setenv("NAPARI_SCLIP_CACHE_DIR", str(tmp_path_factory.mktemp("worker-cache")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        with open_client(workers=2) as client:
            patch.undo()
            yield client


@pytest.fixture
def client(module_client, tiny_dir, tiny_checkpoint):
    """The module's cluster, with the tiny model's segmenter installed on its workers."""
    install_segmenter(module_client, _segmenter_kwargs(tiny_checkpoint),
                      model_configs=[tiny_dir / f"{TINY_MODEL}.json"])
    return module_client


# -- functions that run on the workers (module level, so that they pickle by reference) -----------


def _segmenter_identity(item):
    segmenter = worker_segmenter()
    with using_worker_segmenter() as held:
        assert held is segmenter
    time.sleep(0.02)
    return os.getpid(), id(segmenter), id(segmenter.load())


def _worker_state(dask_worker):
    import torch

    from napari_sclip.engine import model

    plugin = dask_worker.plugins[cluster.PLUGIN_NAME]
    return os.getpid(), id(plugin.segmenter), len(model._CACHE), plugin.load_seconds, torch.get_num_threads()


def _labels(image):
    return worker_segmenter().segment(image, ["a", "b"]).labels


def _double_slowly(item):
    time.sleep(0.02)
    return item * 2


def _fail_on_three(item):
    if item == 3:
        raise ValueError(f"bad item {item}")
    return item


def _pid_after_nap(item):
    worker_segmenter()
    time.sleep(0.25)
    return os.getpid()


# -- the segmenter on the workers --------------------------------------------------------------------


def test_each_worker_loads_the_model_once(client, tiny_dir, tiny_checkpoint):
    before = client.run(_worker_state)
    assert len(before) == 2
    for pid, segmenter_id, cached_models, load_seconds, threads in before.values():
        assert segmenter_id != id(None) and cached_models == 1 and load_seconds is not None
        assert threads == 1  # what the nanny's OMP_NUM_THREADS=1 gives

    results = [result for _, result in
               map_bounded(client, _segmenter_identity, range(24), max_in_flight=4, key_prefix="ident")]
    by_pid = {}
    for pid, segmenter_id, model_id in results:
        by_pid.setdefault(pid, set()).add((segmenter_id, model_id))
    assert set(by_pid) <= {state[0] for state in before.values()}
    assert all(len(identities) == 1 for identities in by_pid.values())  # one segmenter per worker
    # The same segmenter again is a no-op: nothing is loaded again.
    install_segmenter(client, _segmenter_kwargs(tiny_checkpoint),
                      model_configs=[tiny_dir / f"{TINY_MODEL}.json"])
    assert client.run(_worker_state) == before


def test_worker_segmentation_equals_local(client, segmenter, rng):
    image = rng.integers(0, 256, size=(48, 72, 3), dtype=np.uint8)
    remote = client.submit(_labels, image, pure=False).result()
    local = segmenter.segment(image, ["a", "b"]).labels
    assert remote.dtype == local.dtype and np.array_equal(remote, local)


def test_failed_install_leaves_no_broken_plugin(client, tiny_dir, tmp_path):
    missing = tmp_path / "no-such-weights.pt"
    with pytest.raises(SclipError) as caught:
        install_segmenter(client, {"model": TINY_MODEL, "pretrained": str(missing), "device": "cpu"},
                          model_configs=[tiny_dir / f"{TINY_MODEL}.json"])
    assert "\n" not in str(caught.value)
    assert client.run(lambda dask_worker: cluster.PLUGIN_NAME in dask_worker.plugins) == {
        address: False for address in client.scheduler_info()["workers"]
    }
    with pytest.raises(ClusterError, match="no segmenter on Dask worker"):
        client.submit(_labels, np.zeros((32, 32, 3), np.uint8), pure=False).result()


def test_worker_segmenter_outside_a_worker():
    with pytest.raises(ClusterError, match="only works inside a task"):
        worker_segmenter()
    with pytest.raises(ClusterError, match="only works inside a task"):
        with using_worker_segmenter():
            pass


def test_devices_are_shared_out_by_worker():
    choose = cluster.choose_device
    assert choose("cpu", ["cuda:0", "cuda:1"], 3, 4) == "cpu"
    assert choose("cuda:1", None, 0, 4) == "cuda:1"
    assert [choose("auto", ["cuda:0", "cuda:1"], i, 0) for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [choose(None, None, i, 3) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert choose("auto", None, 5, 1) == "auto" and choose(None, None, 5, 0) is None
    assert choose(None, ["cuda:0", "cuda:1"], "SLURMCluster-3", 0) == "cuda:1"
    assert choose(None, ["a", "b"], "no-number", 0) == choose(None, ["a", "b"], "no-number", 0)


# -- the bounded map ---------------------------------------------------------------------------------


def _unfinished_tasks(prefix, dask_scheduler=None):
    return sum(1 for key, task in dask_scheduler.tasks.items()
               if str(key).startswith(prefix) and task.state in ("waiting", "queued", "processing", "no-worker"))


def test_map_bounded_keeps_at_most_max_in_flight(module_client):
    max_in_flight, count = 3, 40
    pulled = received = 0
    outstanding, unfinished = [], []

    def items():
        nonlocal pulled
        for item in range(count):
            pulled += 1
            outstanding.append(pulled - received)
            yield item

    seen = Counter()
    for index, result in map_bounded(module_client, _double_slowly, items(),
                                     max_in_flight=max_in_flight, key_prefix="bounded"):
        unfinished.append(module_client.run_on_scheduler(_unfinished_tasks, "bounded-"))
        received += 1
        assert result == 2 * index
        seen[index] += 1
    assert seen == Counter(range(count))
    # Items are read as tasks complete: max_in_flight at first, then one per completed task,
    # which is read (and its task submitted) before the completed one's result is handed over.
    assert outstanding[:max_in_flight] == list(range(1, max_in_flight + 1))
    assert max(outstanding) == max_in_flight + 1
    assert 1 <= max(unfinished) <= max_in_flight


def _nap(item):
    time.sleep(1.0 if item == 0 else 0.01)
    return item


def test_map_bounded_follows_a_growing_limit_and_an_iterator_that_offers_more(module_client):
    """Workers joining mid-run raise the limit: more tasks go out while the first still runs.
    An iterator that ran dry and offers items again after a result is read again."""
    asked, pulled_before_first_result = [], []
    offered = [1, 2, 3]

    class Items:
        def __iter__(self):
            return self

        def __next__(self):
            if not offered:
                raise StopIteration
            return offered.pop(0)

    def limit() -> int:
        asked.append(time.monotonic())
        return 1 if len(asked) == 1 else 3

    results = []
    items = Items()
    offered.insert(0, 0)  # item 0 naps: the others must go out beside it once the limit grows
    for index, result in map_bounded(module_client, _nap, items, max_in_flight=limit, key_prefix="grow"):
        if not results:
            pulled_before_first_result.append(4 - len(offered))
        results.append(result)
        if result == 0 and 99 not in results:
            offered.append(99)  # the last task is done and the iterator was dry: now it has one more
    assert pulled_before_first_result[0] >= 3  # the grown limit sent more while item 0 napped
    assert sorted(results) == [0, 1, 2, 3, 99] and len(asked) > 2


def test_closing_the_map_cancels_its_tasks(module_client):
    results = map_bounded(module_client, _double_slowly, range(1000), max_in_flight=5,
                          key_prefix="closed")
    next(results)
    results.close()
    deadline = time.monotonic() + 10
    while any(str(key).startswith("closed-") for key in module_client.futures):
        assert time.monotonic() < deadline, list(module_client.futures)
        time.sleep(0.05)
    with pytest.raises(ValueError, match="max_in_flight"):
        next(map_bounded(module_client, _double_slowly, range(3), max_in_flight=0, key_prefix="x"))


def test_a_task_that_raises_propagates(module_client):
    with pytest.raises(ValueError, match="bad item 3"):
        for _ in map_bounded(module_client, _fail_on_three, range(8), max_in_flight=2,
                             key_prefix="raises"):
            pass
    results = dict(map_bounded(module_client, _fail_on_three, range(6), max_in_flight=2,
                               key_prefix="returns", return_exceptions=True))
    assert sorted(results) == list(range(6))
    assert isinstance(results.pop(3), ValueError) and results == {i: i for i in (0, 1, 2, 4, 5)}


def test_a_killed_worker_is_replaced_and_its_items_done_once(tiny_dir, tiny_checkpoint, capfd):
    count = 24
    with open_client(workers=2) as client:
        install_segmenter(client, _segmenter_kwargs(tiny_checkpoint),
                          model_configs=[tiny_dir / f"{TINY_MODEL}.json"], torch_threads=2)
        pids = set(client.run(os.getpid).values())
        victim = min(pids)
        seen = Counter()
        for index, _pid in map_bounded(client, _pid_after_nap, range(count), max_in_flight=4,
                                       key_prefix="kill"):
            seen[index] += 1
            if sum(seen.values()) == 3:
                os.kill(victim, signal.SIGKILL)
        assert seen == Counter(range(count))
        # The nanny started a new worker process, which loaded the model before taking tasks.
        client.wait_for_workers(2, timeout=60)
        after = client.run(_worker_state)
        assert victim not in {state[0] for state in after.values()}
        assert all(state[1] != id(None) and state[2] == 1 and state[4] == 2 for state in after.values())
        # Neither the death, the restart nor a failing task is reported on stderr: the caller
        # hears of failures through the results.
        assert dict(map_bounded(client, _fail_on_three, [3], max_in_flight=1, key_prefix="quiet",
                                return_exceptions=True)).keys() == {0}
    assert capfd.readouterr().err == ""


# -- opening clients ---------------------------------------------------------------------------------


def test_open_client_errors_are_one_line():
    start = time.monotonic()
    with pytest.raises(ClusterError) as caught:
        with open_client(scheduler="tcp://127.0.0.1:1", connect_timeout=2):
            pass
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert message.startswith("cannot reach the Dask scheduler at tcp://127.0.0.1:1: ") and "\n" not in message
    for kwargs, match in (({"workers": 0}, "at least 1"), ({"workers": -2}, "at least 1"),
                          ({}, "local workers or a Dask scheduler"),
                          ({"workers": 2, "scheduler": "tcp://127.0.0.1:8786"}, "not both"),
                          ({"scheduler": "nonsense://x"}, "cannot reach")):
        with pytest.raises(ClusterError, match=match):
            with open_client(**kwargs):
                pass


def test_open_client_connects_to_a_running_scheduler(module_client):
    with open_client(scheduler=module_client.scheduler.address) as other:
        assert other.submit(_double_slowly, 21, pure=False).result() == 42
        assert len(other.scheduler_info()["workers"]) == 2
    assert module_client.submit(_double_slowly, 1, pure=False).result() == 2  # still running


def test_without_distributed_the_options_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ClusterError, match=r"the cluster options need the 'distributed' package: pip install distributed"):
        with open_client(workers=1):
            pass
    code = textwrap.dedent("""
        import sys
        sys.modules["distributed"] = None
        import napari_sclip.dataset.cluster
        print("imported")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr


def test_shutdown_and_failed_connections_are_quiet(tiny_dir, tiny_checkpoint):
    """A local cluster with loaded segmenters closes without a word on stderr, and a scheduler
    that cannot be reached does not leave a half-made client that delays the interpreter's exit."""
    code = textwrap.dedent("""
        import sys
        from napari_sclip.dataset.cluster import (ClusterError, install_segmenter, open_client,
                                                  worker_segmenter)
        try:
            with open_client(scheduler="tcp://127.0.0.1:1", connect_timeout=1):
                pass
        except ClusterError:
            pass
        with open_client(workers=1) as client:
            install_segmenter(client, {"model": sys.argv[1], "pretrained": sys.argv[2], "device": "cpu"},
                              model_configs=[sys.argv[3]])
            assert client.submit(lambda: repr(worker_segmenter())).result().startswith("Segmenter(")
        print("done")
    """)
    done = subprocess.run(
        [sys.executable, "-c", code, TINY_MODEL, str(tiny_checkpoint), str(tiny_dir / f"{TINY_MODEL}.json")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert done.stderr == ""  # a half-made client's __del__ would time out there, with a traceback
