"""Test setup.

Two modes, chosen by MEDITRON_TEST_DEVICE before anything is imported:

- ``cpu`` (the default): the Triton interpreter is switched on before any kernel module is
  imported, so that backend="triton" runs on CPU tensors. This is what CI runs.
- ``cuda``: the kernels run natively on the GPU. TRITON_INTERPRET is left alone (and must not be
  "1"); the op, model and module tests (DEVICE_TESTS) run with CUDA as torch's default device, so
  their tensors, and with them every backend's kernels, live on the GPU, bf16 matrix paths included.
  The accuracy rule is the same. The other tests (distributed, training, benchmarks, builds) are
  skipped there: they are the default mode's. Tests marked ``cpu_only`` check CPU-only behaviour
  and are skipped too.
"""
import os

TEST_DEVICE = os.environ.get("MEDITRON_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"MEDITRON_TEST_DEVICE must be 'cpu' or 'cuda', got {TEST_DEVICE!r}")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("TRITON_INTERPRET") == "1":
    raise ValueError("MEDITRON_TEST_DEVICE=cuda runs the Triton kernels natively: unset TRITON_INTERPRET")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Under pytest-xdist (python -m pytest -n auto) the workers share the cores. torch's default of one
# thread per core in each of them oversubscribes the machine (on 2 cores, two torch processes at
# the default ran several times slower than at one thread each), so each worker, and what it
# launches (torchrun, subprocesses), gets its share; set before torch is imported, which sizes
# its OpenMP pool.
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_THREADS = None
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _THREADS = max(1, _CPUS // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)

import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if _THREADS:
    torch.set_num_threads(_THREADS)  # in case a plugin imported torch before this file

import meditron_kernels  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()
ON_CUDA = TEST_DEVICE == "cuda"
TESTS = Path(__file__).resolve().parent
# What MEDITRON_TEST_DEVICE=cuda runs on the GPU (folders or files under tests/).
DEVICE_TESTS = ("ops", "model", "test_nn.py", "test_helpers.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: checks CPU-only behaviour; skipped under MEDITRON_TEST_DEVICE=cuda")
    if ON_CUDA and not HAS_CUDA:
        raise pytest.UsageError(f"MEDITRON_TEST_DEVICE=cuda, but torch {torch.__version__} sees no CUDA device")


def on_device(path) -> bool:
    """Whether the test file at ``path`` belongs to the GPU run of MEDITRON_TEST_DEVICE=cuda."""
    try:
        rel = Path(path).resolve().relative_to(TESTS)
    except ValueError:
        return False
    return rel.parts[0] in DEVICE_TESTS


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker
        _long_files_first(items)
    if not ON_CUDA:
        return
    other = pytest.mark.skip(reason="MEDITRON_TEST_DEVICE=cuda runs the op, model and module tests; this one runs "
                                    "in the default (CPU) mode")
    cpu_only = pytest.mark.skip(reason="checks CPU-only behaviour (MEDITRON_TEST_DEVICE=cuda)")
    for item in items:
        if not on_device(item.path):
            item.add_marker(other)
        elif item.get_closest_marker("cpu_only"):
            item.add_marker(cpu_only)


def _long_files_first(items):
    """Files in order of their slow and distributed tests, most first (a stable sort: the rest keep
    their order), so that under ``-n`` the long files start first and a short one ends the run."""
    long = {}
    for item in items:
        if item.get_closest_marker("slow") or item.get_closest_marker("distributed"):
            long[item.path] = long.get(item.path, 0) + 1
    items.sort(key=lambda item: -long.get(item.path, 0))


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per CPU this process may use. (xdist counts physical cores when psutil
    is installed, which gives a single worker on a 2-vCPU machine that reports one core with two
    threads; the interpreter's tests are single-threaded Python and use each vCPU.)"""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own setting
    return _CPUS


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``-n``, each test file runs whole on one worker (a --dist other than load still
    chooses), in the workers' collection order (``_long_files_first``): the files' module fixtures
    (torchrun jobs, exported checkpoints, static compiles) run once, not once per worker."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # xdist's default order is by test count, not by length
    return LoadFileScheduling(config, log)


@pytest.fixture(autouse=True)
def _test_device(request):
    """Under MEDITRON_TEST_DEVICE=cuda, tensors a device test creates land on the GPU."""
    if not (ON_CUDA and on_device(request.node.path)):
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.fixture
def device() -> torch.device:
    """The device the tests' tensors live on: cpu, or cuda under MEDITRON_TEST_DEVICE=cuda."""
    return torch.device(TEST_DEVICE)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test, reproducible across runs (a failure can be replayed);
    MEDITRON_TEST_SEED shifts them all, to soak the suite with new inputs."""
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("MEDITRON_TEST_SEED", "0"))
    torch.manual_seed(seed % 2**31)
    yield
